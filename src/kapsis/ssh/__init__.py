"""SSH host verification: which host keys a run trusts, and the files that make ssh check them.

:mod:`.keys` (parsing, fingerprints), :mod:`.providers` (GitHub, GitLab, Bitbucket: pinned and
refreshed lists), :mod:`.hosts` (``kapsis ssh add-host``), :mod:`.trust` (the plan, the
sandbox's files and the host's ssh command).
"""
