#!/usr/bin/env bash
# Install the Python packages used by the reference/bench scripts and the tests that
# compare shoal with llama.cpp. Idempotent: when every pinned package is already
# importable at the pinned version (and llama.cpp was built for this CPU) it only
# reports that and exits.
#
# Python used: $SHOAL_PYTHON if set, else the active virtualenv's python, else the
# `python3` on PATH (the pyenv 3.11 install on the project's machines).
#
# llama-cpp-python has no prebuilt wheel on PyPI for this platform: pip builds
# llama.cpp from source (about 5 minutes on 2 cores). The build is native
# (-DGGML_NATIVE=ON: -march=native, so AVX2/AVX-512/... as the host has them) and
# uses one build job per core.
#
# Options: --force   reinstall/rebuild everything even if it looks installed
#          --check   only report, exit 1 if something is missing
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION="0.3.36"
PINS=(
  "gguf==0.19.0"
  "numpy==2.4.6"
  "jinja2==3.1.6"
  "openai==3.54.0"
)

force=0
check_only=0
for arg in "$@"; do
  case "$arg" in
    --force) force=1 ;;
    --check) check_only=1 ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "setup-python: unknown argument: $arg" >&2; exit 2 ;;
  esac
done

if [[ -n "${SHOAL_PYTHON:-}" ]]; then
  PY="$SHOAL_PYTHON"
elif [[ -n "${VIRTUAL_ENV:-}" && -x "${VIRTUAL_ENV}/bin/python" ]]; then
  PY="${VIRTUAL_ENV}/bin/python"
else
  PY="$(command -v python3 || true)"
fi
if [[ -z "$PY" ]] || ! "$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 9) else 1)' 2>/dev/null; then
  echo "setup-python: need Python >= 3.9 (set SHOAL_PYTHON); found '${PY:-none}'" >&2
  exit 1
fi
echo "setup-python: using $("$PY" -c 'import sys; print(sys.executable, sys.version.split()[0])')"

# Prints the requirement specs (from the list given) whose distribution is missing or
# at another version, or that cannot be imported.
missing_pins() {
  "$PY" - "$@" <<'EOF'
import importlib, importlib.metadata as md, sys
import_names = {"llama-cpp-python": "llama_cpp", "jinja2": "jinja2", "gguf": "gguf", "numpy": "numpy", "openai": "openai"}
for spec in sys.argv[1:]:
    name, want = spec.split("==")
    try:
        have = md.version(name)
    except md.PackageNotFoundError:
        have = None
    ok = have == want
    if ok:
        try:
            importlib.import_module(import_names.get(name, name.replace("-", "_")))
        except Exception:
            ok = False
    if not ok:
        print(spec)
EOF
}

# Checks, in a child process (an illegal instruction must not kill this script), that
# the installed llama.cpp loads and was compiled for exactly this CPU's SIMD features.
# Prints a reason and returns 1 when a rebuild is needed.
llama_matches_cpu() {
  "$PY" - <<'EOF'
import subprocess, sys
code = "import llama_cpp; llama_cpp.llama_backend_init(); print(llama_cpp.llama_print_system_info().decode())"
proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
if proc.returncode != 0:
    print(f"llama_cpp failed to load (exit {proc.returncode})")
    sys.exit(1)
built = {k.strip(): v.strip() for part in proc.stdout.split("|") if "=" in part
         for k, v in [part.split("=", 1)]}
flags = set()
with open("/proc/cpuinfo") as f:
    for line in f:
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
# ggml lists a feature (as "= 1") only when it was compiled in.
pairs = {"AVX": "avx", "AVX2": "avx2", "F16C": "f16c", "FMA": "fma", "BMI2": "bmi2",
         "AVX_VNNI": "avx_vnni", "AVX512": "avx512f", "AVX512_VBMI": "avx512vbmi",
         "AVX512_VNNI": "avx512_vnni", "AVX512_BF16": "avx512_bf16"}
bad = [f"{k}: built={built.get(k, '0')} cpu={'1' if v in flags else '0'}"
       for k, v in pairs.items() if (built.get(k) == "1") != (v in flags)]
if bad:
    print("llama.cpp was not built for this CPU: " + ", ".join(bad))
    sys.exit(1)
print(proc.stdout.strip())
EOF
}

pip_install() {
  local root_flag=()
  if [[ "$(id -u)" == "0" && -z "${VIRTUAL_ENV:-}" ]]; then
    root_flag=(--root-user-action=ignore)
  fi
  "$PY" -m pip install --disable-pip-version-check "${root_flag[@]}" "$@"
}

if (( force )); then
  todo_light=("${PINS[@]}")
  todo_llama=1
  llama_reason="--force"
else
  mapfile -t todo_light < <(missing_pins "${PINS[@]}")
  todo_llama=0
  llama_reason=""
  if [[ -n "$(missing_pins "llama-cpp-python==${LLAMA_CPP_PYTHON_VERSION}")" ]]; then
    todo_llama=1
    llama_reason="llama-cpp-python ${LLAMA_CPP_PYTHON_VERSION} not installed"
  elif ! llama_reason="$(llama_matches_cpu)"; then
    todo_llama=1
  fi
fi

if (( ${#todo_light[@]} == 0 && todo_llama == 0 )); then
  echo "setup-python: all present: llama-cpp-python==${LLAMA_CPP_PYTHON_VERSION} ${PINS[*]}"
  echo "setup-python: llama.cpp build: ${llama_reason}"
  exit 0
fi
if (( check_only )); then
  (( ${#todo_light[@]} )) && echo "setup-python: missing: ${todo_light[*]}"
  (( todo_llama )) && echo "setup-python: llama-cpp-python needs (re)building: ${llama_reason}"
  exit 1
fi

if (( ${#todo_light[@]} )); then
  echo "setup-python: installing ${todo_light[*]}"
  pip_install "${todo_light[@]}"
fi

if (( todo_llama )); then
  jobs="$(nproc 2>/dev/null || echo 2)"
  cmake_args="${CMAKE_ARGS:-}"
  # Respect an explicit choice from the caller; otherwise build for this host's CPU.
  if [[ "$cmake_args" != *GGML_NATIVE* ]]; then
    cmake_args="${cmake_args:+$cmake_args }-DGGML_NATIVE=ON"
  fi
  echo "setup-python: building llama-cpp-python==${LLAMA_CPP_PYTHON_VERSION} from source (${llama_reason})"
  echo "setup-python:   CMAKE_ARGS='${cmake_args}' CMAKE_BUILD_PARALLEL_LEVEL=${jobs}; this takes several minutes"
  for tool in cc c++; do
    command -v "$tool" >/dev/null || { echo "setup-python: '$tool' not found; install build-essential" >&2; exit 1; }
  done
  # --no-cache-dir: a wheel cached from another machine could carry another CPU's
  # -march=native code; the rebuild is only reached when something is wrong anyway.
  CMAKE_ARGS="$cmake_args" CMAKE_BUILD_PARALLEL_LEVEL="$jobs" \
    pip_install --no-cache-dir --force-reinstall --no-deps "llama-cpp-python==${LLAMA_CPP_PYTHON_VERSION}"
  # Its runtime dependencies (diskcache, typing-extensions, ...) normally; numpy/jinja2 stay pinned.
  pip_install "llama-cpp-python==${LLAMA_CPP_PYTHON_VERSION}" "${PINS[@]}"
fi

left="$(missing_pins "llama-cpp-python==${LLAMA_CPP_PYTHON_VERSION}" "${PINS[@]}")"
if [[ -n "$left" ]]; then
  echo "setup-python: still missing after install: $left" >&2
  exit 1
fi
if ! info="$(llama_matches_cpu)"; then
  echo "setup-python: $info" >&2
  exit 1
fi
echo "setup-python: done; llama.cpp build: $info"
