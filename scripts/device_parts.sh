#!/usr/bin/env bash
# Pack what a GPU run on the lent device needs into three carry folders (.c1 .c2 .c3), each small
# enough to travel with the working tree in one device call (64 MiB per call, tree included):
# the MLX CUDA wheels (../shared/device/prepare_wheels.sh makes .whl-a/ and .whl-b/) and, xz
# compressed, the bundled SmolLM2 + the GSM data + Emma. Prints the three device commands.
#
#   bash scripts/device_parts.sh            # after: bash ../shared/device/prepare_wheels.sh
#
# Call 1 (carry .c1) and call 2 (carry .c2) only copy; call 3 (carry .c3) reassembles, installs
# into /tmp/site and unpacks the shared files into /root/shared. Make them back to back: the
# device is given back after ~30 s idle, and what /root holds goes with it.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED="${OPTIQ_SHARED:-$(cd .. && pwd)/shared}"
for d in .whl-a .whl-b; do
  [ -d "$d" ] || { echo "$d/ missing: run bash ../shared/device/prepare_wheels.sh first" >&2; exit 2; }
done
tree_bytes=$( (git ls-files; git ls-files --others --exclude-standard) | xargs -d '\n' du -cb 2>/dev/null | tail -1 | cut -f1)
part=$(( 64 * 1024 * 1024 - tree_bytes - 1024 * 1024 ))  # what one call has left, with 1 MiB to spare
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp .whl-a/* .whl-b/* "$work/"
# OPTIQ_DEVICE_SHARED: which ../shared paths travel (default: the model, the GSM data, the texts)
(cd "$SHARED" && tar -cf - ${OPTIQ_DEVICE_SHARED:-models/smollm2-135m-instruct-q4-exact data/gsm_symbolic data/text}) | xz -T0 -6 > "$work/shared.tar.xz"
(cd "$work" && tar -cf all.tar --exclude all.tar ./*)
rm -rf .c1 .c2 .c3 && mkdir .c1 .c2 .c3
split -b "$part" -d "$work/all.tar" "$work/allpart_"
n=$(ls "$work"/allpart_* | wc -l)
[ "$n" -le 3 ] || { echo "needs $n parts of $part bytes (tree is $tree_bytes bytes): shrink the tree" >&2; exit 1; }
i=1
for f in "$work"/allpart_*; do mv "$f" ".c$i/"; i=$((i + 1)); done
for d in .c1 .c2 .c3; do grep -qx "/$d/" .git/info/exclude || echo "/$d/" >> .git/info/exclude; done
cat <<'EOF'
device calls, back to back (each one is safe to repeat alone: a refused start or a lost machine
leaves /root empty, so every call makes its folder and call 3 counts the parts before it starts):
  1) carry [".c1"]:  mkdir -p /root/p && cp .c1/* /root/p/ && ls /root/p
  2) carry [".c2"]:  mkdir -p /root/p && cp .c2/* /root/p/ && ls /root/p
  3) carry [".c3"]:  R=$PWD; [ "$(ls /root/p/allpart_* 2>/dev/null | wc -l)" = 2 ] || { ls /root/p; echo "parts missing: redo calls 1 and 2"; exit 9; }; cat /root/p/allpart_* .c3/allpart_* > /root/all.tar && mkdir -p /root/w && tar -C /root/w -xf /root/all.tar && cd /root/w && cat part_aa part_ab > $(cat CUDA_WHEEL_NAME) && rm part_aa part_ab /root/all.tar && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site *.whl && mkdir -p /root/shared && xz -dc shared.tar.xz | tar -C /root/shared -xf - && rm -rf /root/repo && cp -r $R /root/repo && cd /root/repo && rm -rf .c3 && export PYTHONPATH=/tmp/site:/root/repo OPTIQ_SHARED=/root/shared && python3 -c "import mlx.core as mx; print(mx.default_device())" && touch /root/launched && ...your command
  later calls:       [ -f /root/launched ] || exit 9; cd /root/repo && export PYTHONPATH=/tmp/site:/root/repo OPTIQ_SHARED=/root/shared && ...
  (a poll loop starts with that check too: a call after a failed launch then ends at once instead of
   spending its whole limit; what it copies into $OUT must be small: e.g.
   `find /root/res /root/curve -name '*.json' -o -name '*.log' | tar -cf /root/r.tmp -T -`, never a
   cache of arrays: a file over the return limit comes back as nothing. Copy changed files into /root/repo first; start long jobs with
   setsid nohup ... & and poll. To stop them, never pkill -f a pattern that appears in your own
   command line: it kills the call.)
EOF
