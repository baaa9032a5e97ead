"""Operator reconcile throughput: AgentRequests handled per second, from create to Pod created.

    python benchmarks/operator.py [--requests 50] [--runs 5]

Runs the kmock Kubernetes API emulator on 127.0.0.1 and the real operator (kapsis.operator,
kopf) in-process, as the k8s tests do. Each run creates ``--requests`` AgentRequests at once in
a fresh namespace and times until every one has its Pod (the operator validated, rendered and
created two ConfigMaps, a NetworkPolicy and the Pod, and wrote the status). As a baseline, the
same run also times creating as many Pods directly through the same client, i.e. what the
emulator itself can take. Prints the median of ``--runs`` runs. Not a test.
"""

from __future__ import annotations

import os
import sys

# This file shares its name with the standard library's ``operator``: its own folder must not
# come first on the path (as it does for ``python benchmarks/operator.py``), or it shadows it.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import argparse  # noqa: E402
import logging  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]


def _pod(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"containers": [{"name": "c", "image": "localhost/kapsis-base:latest"}]},
    }


def _pods_in(cluster: Any, namespace: str) -> int:
    """Pods the emulator holds in ``namespace``, read in-process: polling over HTTP would take
    the very API time being measured."""
    try:
        return sum(
            1
            for (resource, ns, _), obj in list(cluster.emulator.objects.items())
            if resource.plural == "pods" and ns == namespace and not obj.deleted
        )
    except RuntimeError:  # the emulator's dict changed while being read: count again
        return 0


def run_once(cluster: Any, settings: Any, run: int, count: int) -> tuple[float, float]:
    """(operator requests/s, direct Pod creates/s) of one run, each in a fresh namespace."""
    from kubernetes import client
    from tests.k8s.cluster import OperatorThread, create_namespace, new_api_client, wait_for
    from tests.k8s.requests import Requests

    from kapsis.operator.connect import client_configuration
    from kapsis.operator.runner import build_operator

    api = new_api_client(cluster.kubeconfig)
    core = client.CoreV1Api(api)
    namespace, direct = f"bench-{run}", f"bench-direct-{run}"
    create_namespace(api, namespace)
    create_namespace(api, direct)

    start = time.perf_counter()
    for index in range(count):
        core.create_namespaced_pod(direct, _pod(f"p{index}"), _preload_content=False)
    direct_rate = count / (time.perf_counter() - start)

    built = build_operator(settings, client_configuration(cluster.kubeconfig))
    operator = OperatorThread(built.registry, settings=built.kopf_settings, namespaces=(namespace,))
    operator.start()
    try:
        requests = Requests(api, namespace)
        start = time.perf_counter()
        for index in range(count):
            requests.create(f"r{index}")
        wait_for("every Pod", lambda: _pods_in(cluster, namespace) >= count, 300, 0.005)
        operator_rate = count / (time.perf_counter() - start)
    finally:
        operator.stop()
    return operator_rate, direct_rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)

    from tests.k8s.cluster import EmulatedCluster

    from kapsis.k8s.settings import OperatorSettings

    operator_rates: list[float] = []
    direct_rates: list[float] = []
    with tempfile.TemporaryDirectory(prefix="kapsis-bench-operator-") as scratch:
        cluster = EmulatedCluster(Path(scratch)).start()
        try:
            settings = OperatorSettings(
                data_dir=Path(scratch) / "operator", dns_servers=("192.0.2.53",)
            )
            for run in range(args.runs):
                operator_rate, direct_rate = run_once(cluster, settings, run, args.requests)
                operator_rates.append(operator_rate)
                direct_rates.append(direct_rate)
                print(
                    f"run {run + 1}: operator {operator_rate:.1f} requests/s, "
                    f"direct Pod creates {direct_rate:.1f}/s",
                    file=sys.stderr,
                )
        finally:
            cluster.stop()
    print(
        f"operator: {statistics.median(operator_rates):.1f} requests/s from create to Pod "
        f"created ({args.requests} requests, median of {args.runs} runs)"
    )
    print(
        f"baseline: {statistics.median(direct_rates):.1f} Pods/s created directly on the "
        "same emulator"
    )


if __name__ == "__main__":
    main()
