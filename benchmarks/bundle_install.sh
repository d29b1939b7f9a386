#!/usr/bin/env bash
# Install the vLLM or SGLang bundle made by benchmarks/bundle.py on the air-gapped GPU host, one piece per call.
#
#   bash benchmarks/bundle_install.sh vllm|sglang
#
# Each call carries one folder `.bundle/<engine>/<NN>` (a <= 60 MiB piece of one tar + manifest.json). The
# script checks the piece's sha256 against the manifest and copies it to /tmp/pagedinfer-bundle/<engine>/<id>/,
# which lasts while the machine stays warm. The call that completes the set concatenates the pieces, untars
# them, unpacks the .whl.xz files back to wheels, runs `pip install --no-index --no-deps --target
# /tmp/site-<engine>` on them, untars the stripped engine trees there too, and prints on stdout the one line
# to use:
#   export PYTHONPATH=/tmp/site-<engine>${PYTHONPATH:+:$PYTHONPATH}
# so the last call (and every later one, which is then a no-op that prints the line again) can run
#   eval "$(bash benchmarks/bundle_install.sh vllm)" && python3 examples/...
# Messages go to stderr. Exit 0: installed; 2: pieces still missing (it says which folder to carry next);
# 1: an error (bad piece, wrong Python, failed pip).
#
# Calls: one per piece, the install riding on the last one (about 20-40 s more). With the bundles of
# 2026-11-26: vllm 5 calls (.bundle/vllm/00 .. 04, 293 MiB), sglang 6 calls (.bundle/sglang/00 .. 05,
# 344 MiB); bundle.py prints the exact list. Pieces may come in any order. The machine must stay warm
# between calls (a fresh one starts with an empty /tmp: start again from any piece).
#
# BUNDLE_DRY_RUN=1 (for checking a bundle anywhere, e.g. on a networked machine with another Python): skip
# the Python/glibc checks, run pip with --dry-run for CPython 3.12 manylinux x86_64, and list the trees
# instead of installing. BUNDLE_TMP (default /tmp) moves the staging and site folders; PYTHON (default
# python3) picks the interpreter.
set -euo pipefail

engine=${1:-}
case "$engine" in
  vllm|sglang) ;;
  *) echo "usage: bash benchmarks/bundle_install.sh vllm|sglang" >&2; exit 64 ;;
esac
cd "$(dirname "$0")/.."

base=${BUNDLE_TMP:-/tmp}
stage=$base/pagedinfer-bundle/$engine
site=$base/site-$engine
dry=${BUNDLE_DRY_RUN:-0}
py=${PYTHON:-python3}
log() { echo "bundle_install: $*" >&2; }
# json FILE EXPR: evaluate a Python expression over the manifest `m`, printing the result (lists: one a line).
json() {
  "$py" - "$1" "$2" <<'EOF'
import json, sys
m = json.load(open(sys.argv[1]))
v = eval(sys.argv[2], {"m": m})
print("\n".join(map(str, v)) if isinstance(v, list) else v)
EOF
}
export_line() { echo "export PYTHONPATH=$site\${PYTHONPATH:+:\$PYTHONPATH}"; }

mkdir -p "$stage"

# 1. Take in the carried piece(s), each checked against its manifest.
shopt -s nullglob
for dir in .bundle/"$engine"/*/; do
  manifest=$dir/manifest.json
  [ -f "$manifest" ] || continue
  id=$(json "$manifest" 'm["id"]')
  mkdir -p "$stage/$id"
  cp "$manifest" "$stage/$id/manifest.json"
  echo "$id" > "$stage/current"
  for piece in "$dir"piece-*; do
    name=$(basename "$piece")
    if [ -f "$stage/$id/$name" ]; then
      log "$name of bundle $id already staged"
      continue
    fi
    want=$(json "$manifest" "next(p['sha256'] for p in m['pieces'] if p['name'] == '$name')")
    got=$(sha256sum "$piece" | cut -d' ' -f1)
    if [ "$got" != "$want" ]; then
      log "$piece: sha256 $got, manifest says $want (rebuild with benchmarks/bundle.py $engine)"
      exit 1
    fi
    cp "$piece" "$stage/$id/$name.tmp" && mv "$stage/$id/$name.tmp" "$stage/$id/$name"
    log "staged $name of bundle $id ($(du -m "$stage/$id/$name" | cut -f1) MB)"
  done
done

if [ ! -f "$stage/current" ]; then
  log "nothing staged in $stage: carry .bundle/$engine/00 (made by python3 benchmarks/bundle.py $engine)"
  exit 2
fi
id=$(cat "$stage/current")
dir=$stage/$id
manifest=$dir/manifest.json

# 2. Installed already: a no-op.
if [ "$dry" = 0 ] && [ -f "$site/.pagedinfer-bundle" ] && [ "$(cat "$site/.pagedinfer-bundle")" = "$id" ]; then
  log "$engine bundle $id already installed in $site"
  export_line
  exit 0
fi

# 3. Wait for the rest.
total=$(json "$manifest" 'len(m["pieces"])')
missing=()
for folder in $(json "$manifest" '[p["folder"] for p in m["pieces"]]'); do
  [ -f "$dir/piece-$folder" ] || missing+=("$folder")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "have $((total - ${#missing[@]})) of $total pieces of the $engine bundle $id;" \
      "next call: carry .bundle/$engine/${missing[0]} (missing: ${missing[*]})"
  exit 2
fi

# 4. All here: check the interpreter, unpack, install.
want_py=$(json "$manifest" 'm["python"]')
want_glibc=$(json "$manifest" 'm["max_glibc"]')
if [ "$dry" = 0 ]; then
  have_py=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  if [ "$have_py" != "$want_py" ]; then
    log "the bundle holds wheels for Python $want_py; $py is $have_py"
    exit 1
  fi
  have_glibc=$("$py" -c 'import os; print(os.confstr("CS_GNU_LIBC_VERSION").split()[-1])' 2>/dev/null || echo 0)
  if ! "$py" -c "import sys; a, b = ('$have_glibc', '$want_glibc'); sys.exit(tuple(map(int, a.split('.')[:2])) < tuple(map(int, b.split('.'))))" 2>/dev/null; then
    log "warning: some wheels need glibc >= $want_glibc, this host has $have_glibc"
  fi
fi

work=$(mktemp -d "$stage/unpack.XXXXXX")
target=$(mktemp -d "$base/site-$engine.tmp.XXXXXX")
trap 'rm -rf "$work" "$target"' EXIT
pieces=()
for folder in $(json "$manifest" '[p["folder"] for p in m["pieces"]]'); do pieces+=("$dir/piece-$folder"); done
got=$(cat "${pieces[@]}" | sha256sum | cut -d' ' -f1)
want=$(json "$manifest" 'm["tar_sha256"]')
if [ "$got" != "$want" ]; then
  log "the concatenated pieces hash to $got, manifest says $want"
  exit 1
fi
cat "${pieces[@]}" | tar -x -C "$work"
for f in $(json "$manifest" 'm["wheels"] + m["trees"]'); do
  [ -f "$work/wheels/$f" ] || [ -f "$work/trees/$f" ] || { log "bundle lacks $f"; exit 1; }
done
"$py" - "$work/wheels" <<'EOF'
import lzma, pathlib, shutil, sys
for packed in sorted(pathlib.Path(sys.argv[1]).glob("*.whl.xz")):  # back to wheels (entries stored)
    with lzma.open(packed) as fin, open(packed.with_suffix(""), "wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)
    packed.unlink()
EOF
wheels=("$work"/wheels/*.whl)
log "installing ${#wheels[@]} wheels into $site$([ "$dry" = 0 ] || echo " (dry run)")"
pip_args=(install --no-index --no-deps --no-compile --disable-pip-version-check --no-warn-script-location --root-user-action=ignore
          --quiet --target "$target")
if [ "$dry" != 0 ]; then
  pip_args+=(--dry-run --ignore-requires-python --only-binary=:all: --python-version "$want_py" --implementation cp
             --abi "cp${want_py/./}" --abi abi3 --abi none --platform linux_x86_64 --platform manylinux2014_x86_64
             --platform manylinux2010_x86_64 --platform manylinux1_x86_64)
  for minor in $(seq 5 40); do pip_args+=(--platform "manylinux_2_${minor}_x86_64"); done
fi
rc=0
"$py" -m pip "${pip_args[@]}" "${wheels[@]}" >"$work/pip.log" 2>&1 || rc=$?
grep -v "WARNING: Location" "$work/pip.log" >&2 || true
if [ "$rc" != 0 ]; then log "pip failed (exit $rc)"; exit 1; fi
for tree in "$work"/trees/*.tar.xz; do
  if [ "$dry" != 0 ]; then
    log "$(basename "$tree"): $(tar -tJf "$tree" | cut -d/ -f1 | sort -u | tr '\n' ' ')"
    continue
  fi
  log "untarring $(basename "$tree")"
  "$py" -c 'import sys, tarfile; t = tarfile.open(sys.argv[1]); t.extractall(sys.argv[2], filter="data")' "$tree" "$target"
done
if [ "$dry" != 0 ]; then
  log "dry run: the $engine bundle $id is complete and pip accepts its wheels for CPython $want_py"
  exit 0
fi
echo "$id" > "$target/.pagedinfer-bundle"
rm -rf "$site"
mv "$target" "$site"
rm -rf "$work"
trap - EXIT
log "$engine bundle $id installed in $site ($(du -sm "$site" | cut -f1) MB)"
export_line
