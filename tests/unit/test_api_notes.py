"""An agent that retried an unreachable model endpoint says why at the end of its run: one
"no answer from HOST" note per model API host the gateway could not serve, first."""

from __future__ import annotations

from kapsis.network.observe import DnsEvent, NetworkReport, ProxyDecision, api_notes

API = ("api.openai.com", "llm.test")


def test_each_api_host_the_gateway_could_not_serve_is_said_once() -> None:
    report = NetworkReport(
        dns=[
            DnsEvent("api.openai.com.", "A", "rebind", reason="answer in a private range"),
            DnsEvent("api.openai.com.", "AAAA", "rebind", reason="answer in a private range"),
            DnsEvent("llm.test.", "A", "unresolved"),
            DnsEvent("pypi.org.", "A", "blocked", reason="not on the allowlist"),
        ],
        blocked=[],
    )
    assert api_notes(report, API) == [
        "no answer from api.openai.com: the gateway refused its name (answer in a private range)",
        "no answer from llm.test: it could not be resolved",
    ]


def test_a_refused_connection_to_an_api_host_is_said() -> None:
    report = NetworkReport(
        dns=[],
        blocked=[],
        proxy=[ProxyDecision("llm.test", 8443, "tls", "198.51.100.9", False, "port not allowed")],
    )
    assert api_notes(report, API) == [
        "no answer from llm.test: the gateway refused the connection (port not allowed)"
    ]


def test_control_what_went_through_or_is_not_the_apis_says_nothing() -> None:
    report = NetworkReport(
        dns=[
            DnsEvent("api.openai.com.", "A", "allowed", answers=["198.51.100.7"]),
            DnsEvent("pypi.org.", "A", "blocked", reason="not on the allowlist"),
        ],
        blocked=[],
        proxy=[ProxyDecision("api.openai.com", 443, "tls", "198.51.100.7", True)],
    )
    assert api_notes(report, API) == []


def test_lookups_no_api_client_makes_say_nothing() -> None:
    """The agent can get a TXT query of the API's name refused, or flood it past the rate: the
    API's own lookups went through, and no note may claim otherwise."""
    report = NetworkReport(
        dns=[
            DnsEvent("api.openai.com.", "TXT", "refused", reason="query type not allowed"),
            DnsEvent("api.openai.com.", "A", "refused", reason="over the query rate"),
            DnsEvent("api.openai.com.", "A", "allowed", answers=["198.51.100.7"]),
        ],
        blocked=[],
    )
    assert api_notes(report, API) == []
