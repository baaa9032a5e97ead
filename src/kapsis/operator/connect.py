"""How the operator reaches the API server: in-cluster service account, or a kubeconfig.

One client configuration serves both the kubernetes client (the operator's own calls) and
kopf's watches (its login handler), so both talk to the same server with the same identity.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from kapsis.errors import ConfigError

IN_CLUSTER_ENV = "KUBERNETES_SERVICE_HOST"


def client_configuration(kubeconfig: Path | None = None) -> Any:
    """A ``kubernetes.client.Configuration``: from ``kubeconfig`` if given, else in-cluster
    when running in a Pod, else from ``$KUBECONFIG`` / ``~/.kube/config``."""
    from kubernetes import client, config as kube_config

    config: Any = kube_config  # its loaders are untyped
    configuration = client.Configuration()
    try:
        if kubeconfig is None and os.environ.get(IN_CLUSTER_ENV):
            config.load_incluster_config(client_configuration=configuration)
        else:
            config.load_kube_config(
                config_file=str(kubeconfig) if kubeconfig else None,
                client_configuration=configuration,
            )
    except (config.ConfigException, OSError) as error:
        where = kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
        raise ConfigError(f"cannot reach a Kubernetes API server ({where}): {error}") from None
    return configuration


def api_client(configuration: Any) -> Any:
    from kubernetes import client

    # kopf runs sync handlers in a pool of threads that share this client's connections.
    configuration.connection_pool_maxsize = max(configuration.connection_pool_maxsize or 0, 32)
    return client.ApiClient(configuration)


def kopf_login(configuration: Any) -> Any:
    """A kopf login handler that uses ``configuration``."""

    def login(**_: Any) -> Any:
        import kopf

        header = configuration.get_api_key_with_prefix(
            "BearerToken"
        ) or configuration.get_api_key_with_prefix("authorization")
        scheme, _sep, token = str(header or "").partition(" ")
        if scheme and not token:  # a bare token without a scheme
            scheme, token = "Bearer", scheme
        return kopf.ConnectionInfo(
            server=configuration.host,
            ca_path=configuration.ssl_ca_cert,
            insecure=not configuration.verify_ssl,
            username=configuration.username or None,
            password=configuration.password or None,
            scheme=scheme or None,
            token=token or None,
            certificate_path=configuration.cert_file,
            private_key_path=configuration.key_file,
        )

    return login
