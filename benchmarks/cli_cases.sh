#!/usr/bin/env bash
# Every user-facing case of `baffle train` (output folders, resume, cadence, progress, data checks, bad
# input), run as a user would from the repository root with the venv active, printed as a markdown table:
# command, exit code, and the lines the user sees (stderr first; for a run, its first and last lines).
#
#     . .venv/bin/activate && bash benchmarks/cli_cases.sh > /tmp/cases.md
#
# Needs ../shared/datasets for the data-check cases (skipped without). The full-disk case mounts a tiny
# tmpfs and is skipped where mount is not allowed. Everything is written under one temporary folder.
set -uo pipefail
T=$(mktemp -d)
trap 'umount "$T/full" 2>/dev/null; rm -rf "$T"' EXIT
DATA=../shared/datasets
RUN=(--rounds 4 --no-progress)

echo "| # | command | exit | what the user sees |"
echo "|---|---|---|---|"
n=0
case_() {  # case_ "shown command" command args...
    local shown=$1; shift
    n=$((n + 1))
    "$@" </dev/null >"$T/out" 2>"$T/err"
    local rc=$?
    local seen
    if [ -s "$T/err" ]; then
        seen=$(head -c 400 "$T/err" | head -n 2)
    else
        seen=$( (head -n 1 "$T/out"; [ "$(wc -l <"$T/out")" -gt 1 ] && tail -n 1 "$T/out") | head -c 400)
    fi
    seen=${seen//$T/\$T}
    seen=${seen//|/\\|}
    printf '| %d | `%s` | %d | %s |\n' "$n" "${shown//$T/\$T}" "$rc" "$(printf '%s' "$seen" | sed ':a;N;$!ba;s/\n/ ⏎ /g')"
}

case_ "baffle --version" baffle --version
cd "$T" && case_ "baffle train --rounds 4 --no-progress  # no --out" baffle train "${RUN[@]}"; cd - >/dev/null
ls -d "$T"/runs/* >/dev/null 2>&1 && echo "|   | (the folder above exists: \`$(cd "$T" && ls -d runs/*)\`) | | |"

# output folders, each checked before any data loads
echo x > "$T/file"
case_ "baffle train ${RUN[*]} --out $T/file" baffle train "${RUN[@]}" --out "$T/file"
case_ "baffle train ${RUN[*]} --out $T/file/run" baffle train "${RUN[@]}" --out "$T/file/run"
case_ "baffle train ${RUN[*]} --out /proc/run" baffle train "${RUN[@]}" --out /proc/run
mkdir -p "$T/full"
if mount -t tmpfs -o size=64k tmpfs "$T/full" 2>/dev/null; then
    head -c 60000 /dev/zero > "$T/full/fill" 2>/dev/null
    case_ "baffle train ${RUN[*]} --out $T/full/run  # 64 KiB tmpfs, full" baffle train "${RUN[@]}" --out "$T/full/run"
else
    echo "|   | full disk: skipped (mount not allowed here) | | |"
fi
case_ "baffle train --resume --no-progress  # no --out" baffle train --resume --no-progress

# a run, then every way of resuming it
case_ "baffle train ${RUN[*]} --checkpoint-every 2 --out $T/a" baffle train "${RUN[@]}" --checkpoint-every 2 --out "$T/a"
case_ "baffle train ${RUN[*]} --out $T/a  # again, without --resume" baffle train "${RUN[@]}" --out "$T/a"
case_ "baffle train --resume --out $T/a --threads 2 --no-progress" baffle train --resume --out "$T/a" --threads 2 --no-progress
case_ "baffle train --resume --out $T/a --sigma 0.01 --no-progress" baffle train --resume --out "$T/a" --sigma 0.01 --no-progress
case_ "baffle train --resume --out $T/a --rounds 2 --no-progress" baffle train --resume --out "$T/a" --rounds 2 --no-progress
case_ "baffle train --resume --out $T/a --rounds 6 --no-progress" baffle train --resume --out "$T/a" --rounds 6 --no-progress
case_ "baffle train --resume --out $T/a --no-progress  # finished" baffle train --resume --out "$T/a" --no-progress
rm "$T/a/summary.json"; touch "$T/a/metrics.jsonl"
head -c 5000 "$T/a/checkpoint.pt" > "$T/cut" && mv "$T/cut" "$T/a/checkpoint.pt"
case_ "baffle train --resume --out $T/a --rounds 8 --no-progress  # checkpoint cut to 5000 bytes" baffle train --resume --out "$T/a" --rounds 8 --no-progress
mkdir -p "$T/m" && echo '{}' > "$T/m/metrics.jsonl"
case_ "baffle train ${RUN[*]} --out $T/m  # holds metrics.jsonl, no checkpoint" baffle train "${RUN[@]}" --out "$T/m"

# progress without a terminal, interrupts
case_ "baffle train --rounds 6 --log-every 3 --out $T/p  # stdout redirected" baffle train --rounds 6 --log-every 3 --out "$T/p"
case_ "baffle train --rounds 100000 --out $T/i --no-progress  # Ctrl-C after 3 s" \
    timeout --preserve-status -s INT 3 baffle train --rounds 100000 --out "$T/i" --no-progress
case_ "baffle train --rounds 100000 --checkpoint-every 1 --out $T/j --no-progress  # Ctrl-C after 8 s" \
    timeout --preserve-status -s INT 8 baffle train --rounds 100000 --checkpoint-every 1 --out "$T/j" --no-progress

# bad input names its flag or key
case_ "baffle train --sigma -1 --out $T/b" baffle train --sigma -1 --out "$T/b"
case_ "baffle train --clients 0 --out $T/b" baffle train --clients 0 --out "$T/b"
case_ "baffle train --checkpoint-every 5parsecs --out $T/b" baffle train --checkpoint-every 5parsecs --out "$T/b"
case_ "baffle train --method backprop --out $T/b" baffle train --method backprop --out "$T/b"
printf 'rounds = 3\nsigmma = 0.1\n' > "$T/bad.toml"
case_ "baffle train --config bad.toml --out $T/b  # sigmma = 0.1" baffle train --config "$T/bad.toml" --out "$T/b"
printf 'rounds = [3\n' > "$T/broken.toml"
case_ "baffle train --config broken.toml --out $T/b  # rounds = [3" baffle train --config "$T/broken.toml" --out "$T/b"
case_ "baffle train --config missing.toml --out $T/b" baffle train --config "$T/missing.toml" --out "$T/b"

# data checks
case_ "baffle train --dataset mnist --out $T/b  # no --data-dir" baffle train --dataset mnist --out "$T/b"
if [ -d "$DATA/fashion-mnist" ]; then
    mkdir -p "$T/wrong/mnist" && cp "$DATA"/fashion-mnist/* "$T/wrong/mnist/"
    case_ "baffle train --dataset mnist --data-dir wrong/  # Fashion-MNIST files in wrong/mnist/" baffle train --dataset mnist --data-dir "$T/wrong" --rounds 1 --out "$T/b"
    case_ "baffle train --dataset mnist --data-dir $DATA --rounds 2 --no-progress --out $T/d" baffle train --dataset mnist --data-dir "$DATA" --rounds 2 --no-progress --out "$T/d"
else
    echo "|   | data checks: skipped ($DATA not found) | | |"
fi
