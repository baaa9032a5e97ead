"""Assemble and run the operator: kopf settings, the registry of handlers, the run.

``build_operator`` makes everything a kopf run needs from ``OperatorSettings`` and a client
configuration, so the tests run the very same operator in-process that ``python -m
kapsis.operator`` (and ``kapsis operator run``) runs in the Deployment.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kapsis.errors import ConfigError
from kapsis.k8s import resource as ar
from kapsis.k8s.settings import OperatorSettings
from kapsis.operator.audit import OperatorAudit
from kapsis.operator.connect import api_client, client_configuration, kopf_login
from kapsis.operator.handlers import Reconciler, register
from kapsis.operator.kube import Kube

FINALIZER = f"{ar.GROUP}/cleanup"


@dataclass
class BuiltOperator:
    """What ``kopf.operator``/``kopf.run`` takes, plus the parts tests look at."""

    registry: Any
    kopf_settings: Any
    reconciler: Reconciler
    audit: OperatorAudit


def kopf_settings(workers: int = 32) -> Any:
    import kopf

    settings = kopf.OperatorSettings()
    # kopf's bookkeeping goes to annotations: a CRD's structural schema would prune status.kopf.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=ar.GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=ar.GROUP, key="last-handled-configuration"
    )
    settings.persistence.finalizer = FINALIZER
    # The operator posts its own events; kopf's are only for its errors.
    settings.posting.level = logging.WARNING
    settings.execution.max_workers = workers
    settings.watching.server_timeout = 300
    return settings


def build_operator(settings: OperatorSettings, configuration: Any) -> BuiltOperator:
    import kopf

    audit = OperatorAudit(settings.data_dir)
    try:
        audit.export_public_key()
    except OSError as error:
        raise ConfigError(
            f"KAPSIS_OPERATOR_DATA_DIR {settings.data_dir}: cannot keep the audit key there "
            f"({error.strerror}); point it at a writable directory"
        ) from None
    reconciler = Reconciler(Kube(api_client(configuration)), settings, audit)
    registry = kopf.OperatorRegistry()
    kopf.on.login(registry=registry, id="login")(kopf_login(configuration))
    register(registry, reconciler)
    return BuiltOperator(registry, kopf_settings(), reconciler, audit)


def run(
    settings: OperatorSettings,
    *,
    kubeconfig: Path | None = None,
    namespaces: tuple[str, ...] = (),
) -> None:
    """Run the operator in this thread until it is stopped (SIGTERM, SIGINT)."""
    import kopf

    built = build_operator(settings, client_configuration(kubeconfig))
    kopf.run(
        registry=built.registry,
        settings=built.kopf_settings,
        standalone=True,
        namespaces=namespaces,
        clusterwide=not namespaces,
    )
