# Sourced by every non-interactive bash the agent starts (BASH_ENV, set by Kapsis): each command
# it runs is traced, as typed and as expanded, to a pipe that the host reads into the audit
# trail as an agent-reported command. The agent's own shell does the tracing, so the agent can
# turn it off: a record of what it did, not a control.
if [ -z "${BASH_XTRACEFD-}" ] && [ -p /run/kapsis/trace.fifo ] \
    && { exec {KAPSIS_TRACE_FD}<>/run/kapsis/trace.fifo; } 2>/dev/null; then
    BASH_XTRACEFD=$KAPSIS_TRACE_FD
    PS4=$'+ ${BASH_COMMAND@Q}\t'
    set -x
fi
