"""The start-up server: a warm process that has Kapsis imported and forks a child per command.

Importing pydantic, typer and the config and plan models takes longer than podman needs to
start a container, so a fresh interpreter per ``kapsis`` command would spend most of a launch
importing. The ``kapsis`` command is therefore a small client (:mod:`.client`, standard library
only) that hands its argv, environment, working directory, umask and standard streams to a
server of the same user and the same code (:mod:`.server`); the server forks, the child becomes
the command, and its exit status comes back. With no server, the client runs the command itself
and starts one for the next command. ``KAPSIS_NO_SERVER=1`` turns all of this off.

The modules here import only the standard library at module level: the client's start-up is what
every command pays.
"""
