"""A scripted model endpoint for the real agent CLIs: one HTTP server, one module per API.

Each built-in agent speaks its vendor's API: Claude Code the Anthropic Messages API
(:mod:`.anthropic`), Codex CLI the OpenAI Responses API (:mod:`.openai_responses`), Aider the
OpenAI Chat Completions API (:mod:`.openai_chat`), Gemini CLI the Gemini API (:mod:`.gemini`).
:mod:`.server` serves all of them on one address and dispatches each request by its path to the
module that :meth:`~.script.Api.matches` it; every module plays the same :class:`~.script.Script`
(write one file, then say it is done), deciding each answer from the request alone (a stateless
answer cannot lose track when a CLI sends side requests, retries or a title request).

Run inside the test internet's network namespace (standard library only)::

    python -m tests.integration.model_endpoint serve ADDRESS PORT LOG FILE_PATH CONTENT
"""
