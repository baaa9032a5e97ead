#!/bin/sh
# Kapsis secrets hand-over (mounted read-only into the sandbox and run before the agent).
# The host writes each secret into a named pipe of /run/kapsis/secrets-in, listed in order in
# its manifest. A pipe holds data in kernel memory only, so no value is ever in a file on disk:
# environment secrets are exported to the agent's process, file secrets written onto a tmpfs
# with mode 0600. Then this script becomes the agent command.
set -eu
IN=/run/kapsis/secrets-in
umask 077
while read -r kind name target; do
    case "$kind" in
        env)
            # The trailing dot keeps trailing newlines that $(...) would strip.
            value=$(cat "$IN/$name"; printf .)
            export "$name=${value%.}"
            ;;
        file)
            mkdir -p "$(dirname "$target")"
            cat "$IN/$name" > "$target"
            ;;
    esac
done < "$IN/manifest"
unset value IN
exec "$@"
