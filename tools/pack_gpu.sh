#!/usr/bin/env bash
# Packs, for the GPU machine (Python 3.12, torch, timm, accelerate, numba, opencv, pytest there; no
# package registry; ≤ 64 MiB carried per call, the working tree included), what this project
# needs and it lacks, in as few carried folders as it fits. From the repository root:
#   tools/pack_gpu.sh          # ~10 min cold (the xz of DALI), seconds when .device/cache is current
# writes the ignored .device/:
#   call1/   the main call's carry: DALI 2.4.0 (nvImageCodec, nvJPEG) as one xz tar for an sm_90
#            GPU (tools/slim_elf.py), DALI's Python needs (optree, gast, astunparse), omegaconf
#   call0/   an optional first call's carry: FFCV 1.0.2 built here for Python 3.12 with the
#            libraries it links, Pillow 12 (used there only if the machine's is 13+)
# and prints each folder's size; README.md "GPU" gives the `run` calls. tools/gpu_session.sh
# installs it there. Needs pip (downloads by name), and a Python 3.12 (pyenv or PY312) for FFCV.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}; out=.device; cache=$out/cache; limit_mib=${PART_MIB:-62}
keep_sm=${KEEP_SM:-90}  # the GPU's compute capability × 10 (H100 and H200: 90); 0 keeps every GPU architecture
mkdir -p "$cache/dl" "$cache/ffcv"
grep -qx '/.device/' .gitignore || echo '/.device/' >> .gitignore

download() {  # cp312 manylinux wheels, no dependencies (each is named)
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$cache/dl" "$@"
}
download nvidia-dali-cuda130==2.4.0 nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-nvjpeg==13.3.2.43 \
  optree==0.20.0 gast==0.7.0 astunparse==1.6.3 omegaconf==2.4.0 pillow==12.3.0 \
  terminaltables==3.1.10 fastargs==0.3.0 pytorch_pfn_extras==0.9.0

# --- DALI: only what one sm_90 GPU under Python 3.12 loads, as one xz tar -------------------------
recipe=1  # bump when what the tree leaves out changes (the key: the wheels, tools/slim_elf.py, this, KEEP_SM)
dali_key=$( { cat "$cache"/dl/nvidia_{dali,nvimgcodec,nvjpeg}*.whl tools/slim_elf.py; echo "$recipe"; } | sha256sum | cut -c1-16)
if [ "$(cat "$cache/dali.key" 2>/dev/null)" != "$dali_key-$keep_sm" ]; then
  tree=$cache/tree; rm -rf "$tree" "$cache/dali.tar.xz"; mkdir -p "$tree"
  for wheel in "$cache"/dl/nvidia_{dali,nvimgcodec,nvjpeg}*.whl; do "$py" -m zipfile -e "$wheel" "$tree"; done
  (cd "$tree" && rm -rf ./*.dist-info nvidia/dali/include nvidia/nvimgcodec/include nvidia/nvimgcodec/tools \
     nvidia/cu13/include nvidia/nvimgcodec/nvimgcodec_impl.* nvidia/nvimgcodec/extensions/lib{nvjpeg2k,nvtiff,tiff}_ext* \
   && find . -name '*cpython-*' ! -name '*cpython-312-*' -delete)
  # DALI's decoders keep nvImageCodec's library and its nvJPEG, libjpeg-turbo and OpenCV (PNG, ...) extensions
  find "$tree" -name '*.so*' -type f -print0 | xargs -0 "$py" tools/slim_elf.py --keep-sm "$keep_sm" > "$cache/slim.log"
  echo "DALI tree: $(du -sh "$tree" | cut -f1) after tools/slim_elf.py; compressing (xz -9e, x86 filter: minutes)"
  tar -C "$tree" --owner=0 --group=0 -cf - nvidia | xz -T1 --x86 --lzma2=preset=9e,dict=256MiB > "$cache/dali.tar.xz.tmp"
  mv "$cache/dali.tar.xz.tmp" "$cache/dali.tar.xz"; echo "$dali_key-$keep_sm" > "$cache/dali.key"; rm -rf "$tree"
fi

# --- FFCV for Python 3.12, against this machine's libturbojpeg/OpenCV, those libraries alongside ----
v=$(pyenv versions --bare 2>/dev/null | grep -m1 '^3\.12' || true)
py312=${PY312:-$( { [ -n "$v" ] && PYENV_VERSION=$v pyenv which python 2>/dev/null; } || command -v python3.12 || true)}
if [ -x "$py312" ] && [ ! -f "$cache/ffcv/ffcv-libs.tar.xz" ]; then
  "$py" -m pip download -q --no-deps --no-binary ffcv ffcv==1.0.2 -d "$cache/ffcv"
  "$py312" -m pip wheel -q --no-deps "$cache"/ffcv/ffcv-1.0.2.tar.gz -w "$cache/ffcv"
  rm -rf "$cache/ffcv/x" "$cache/ffcv/lib"; mkdir -p "$cache/ffcv/x" "$cache/ffcv/lib"
  "$py" -m zipfile -e "$cache"/ffcv/ffcv-1.0.2-cp312-*.whl "$cache/ffcv/x"
  ldd "$cache"/ffcv/x/ffcv/_libffcv*.so | awk '/=> \// {print $3}' \
    | grep -v -E '/lib(c|m|gcc_s|stdc\+\+|z|pthread|dl|rt)\.so' | xargs -I{} cp -L {} "$cache/ffcv/lib/"
  tar -C "$cache/ffcv" -cf - lib | xz -9 > "$cache/ffcv/ffcv-libs.tar.xz"; rm -rf "$cache/ffcv/x" "$cache/ffcv/lib"
elif [ ! -x "$py312" ]; then echo "no Python 3.12 here (pyenv or PY312): FFCV is left out; its GPU test will skip"; fi

# --- the carried folders ------------------------------------------------------------------------
rm -rf "$out"/call*; mkdir -p "$out/call1/wheels" "$out/call0/wheels"
for w in optree gast astunparse omegaconf; do cp "$cache"/dl/$w-*.whl "$out/call1/wheels/"; done
for w in pillow terminaltables fastargs pytorch_pfn_extras; do cp "$cache"/dl/$w-*.whl "$out/call0/wheels/"; done
if [ -f "$cache/ffcv/ffcv-libs.tar.xz" ]; then cp "$cache"/ffcv/ffcv-1.0.2-cp312-*.whl "$cache/ffcv/ffcv-libs.tar.xz" "$out/call0/"
  mv "$out"/call0/ffcv-1.0.2-*.whl "$out/call0/wheels/"; fi
# DALI: as much as fits into call1, the rest into call0 (one part each)
room=$(( limit_mib * 1048576 - $(du -sb "$out/call1" | cut -f1) - $(git ls-files -z | du -cb --files0-from=- | tail -1 | cut -f1) ))
size=$(stat -c %s "$cache/dali.tar.xz")
if [ "$size" -le "$room" ]; then cp "$cache/dali.tar.xz" "$out/call1/dali.tar.xz.a"
else head -c "$room" "$cache/dali.tar.xz" > "$out/call1/dali.tar.xz.a"  # the parts join in name order: a, b
  tail -c +$(( room + 1 )) "$cache/dali.tar.xz" > "$out/call0/dali.tar.xz.b"; fi
for call in "$out"/call0 "$out"/call1; do
  { echo "packed $(date -u +%FT%TZ) by tools/pack_gpu.sh for sm_$keep_sm, Python 3.12: $(basename "$call")";
    echo "dali.tar.xz $size $(sha256sum "$cache/dali.tar.xz" | cut -c1-64)";
    (cd "$call" && find . -type f ! -name MANIFEST -printf '%P %s\n' | sort); } > "$call/MANIFEST"
done
[ -n "$(ls "$out/call0" | grep -v -x -E 'MANIFEST|wheels')" ] || [ -n "$(ls "$out/call0/wheels")" ] || rm -rf "$out/call0"
for call in "$out"/call*; do echo "$call: $(du -sb "$call" | awk '{printf "%.1f MiB", $1 / 1048576}')"; done
if [ -f "$out/call0/dali.tar.xz.b" ]; then echo "DALI is split: call0 is needed (README \"GPU\")"; fi
