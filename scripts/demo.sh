#!/usr/bin/env bash
# Demo: an agent edits a project inside its sandbox; the host commits its work to the agent's own
# branch, and the user's checkout stays exactly as it was.
#
# Makes a small git repo in a temp dir, runs the built-in `shell` agent on it with a task that
# edits README.md and creates hello.py, then shows the commit on the agent's branch, that the
# checkout has no changes, and `kapsis status`. Set KAPSIS_DEMO_KEEP=1 to keep the sample repo.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
KAPSIS="$ROOT/.venv/bin/kapsis"
[ -x "$KAPSIS" ] || { echo "demo.sh: $KAPSIS not found; run scripts/install.sh first" >&2; exit 1; }

say() { printf '==> %s\n' "$*"; }

work="$(mktemp -d "${TMPDIR:-/tmp}/kapsis-demo.XXXXXX")"
if [ "${KAPSIS_DEMO_KEEP:-0}" != 1 ]; then
    trap 'rm -rf "$work"' EXIT
fi
repo="$work/sample"
mkdir -p "$repo"

cat > "$repo/README.md" <<'EOF'
# Sample project

A tiny project for the Kapsis demo.
EOF
cat > "$repo/app.py" <<'EOF'
def greet(name: str) -> str:
    return f"Hello, {name}!"


if __name__ == "__main__":
    print(greet("world"))
EOF
git -C "$repo" init -q -b main
# The sample repo's own identity: the host commits the agent's work as the repo's user.
git -C "$repo" config user.name "Kapsis demo"
git -C "$repo" config user.email demo@kapsis.invalid
git -C "$repo" add README.md app.py
git -C "$repo" commit -q -m "Initial commit"
say "sample repo: $repo"

# Run by `sh -c` in /workspace, the agent's copy-on-write view of the repo.
task="$(cat <<'EOF'
echo "A line added by an agent, inside its sandbox." >> README.md
printf 'print("hello from the sandbox")\n' > hello.py
python3 hello.py
git -C /workspace status --short
EOF
)"

say "kapsis run $repo --agent shell --branch demo/hello --task '...'"
"$KAPSIS" run "$repo" --agent shell --branch demo/hello --task "$task"

say "git -C $repo log --stat main..demo/hello: the host's commit of the agent's work"
git -C "$repo" --no-pager log --stat main..demo/hello

changes="$(git -C "$repo" status --short)"
if [ -n "$changes" ]; then
    echo "demo.sh: the host's repo changed, which must never happen:" >&2
    echo "$changes" >&2
    exit 1
fi
say "git -C $repo status --short: empty, still on $(git -C "$repo" branch --show-current); the agent's work is only on its branch"

say "kapsis status"
"$KAPSIS" status
