"""`edgellm convert --lora runs/<name> --base-gguf models/<base>.gguf --out models/<name>`: PEFT LoRA adapters as
GGUF LoRA files that llama.cpp applies at run time on one shared base, each checked and recorded in
``<out>/adapters.json`` (`edgellm.manifest.AdapterManifest`).

setup (the adapters, the base GGUF, its Hugging Face folder, a 16-bit GGUF of the same base) -> for each adapter:
convert (llama.cpp's own ``convert_lora_to_gguf.py``) -> check it fits the base (architecture, tensor shapes) ->
verify (base + adapter in llama.cpp against the Hugging Face base with the adapter merged in, float32: KL per
position over held-out conversations; the mean on the 16-bit base is the gate) -> the manifest.

Why the gate runs on a 16-bit base: there the only differences from the merged model are 16-bit rounding (of the
base weights and of the adapter's A and B), so a failure means a broken conversion (a wrong tensor layout, a wrong
scale, another base). On the quantized base one serves (Q4_1 by default) the quantization error adds to that; it
is measured and recorded (``verification.served``) but not gated.

    manifest = convert_adapters(Path("runs/personas"), Path("models/SmolLM2-135M-Instruct.Q4_1.gguf"),
                                Path("models/personas"))
    manifest.adapter("hammy").verification.reference.kl_mean
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from edgellm.convert.llamacpp import (
    Converter,
    ConvertError,
    read_gguf,
    require_converter,
    run_converter,
    run_lora_converter,
)
from edgellm.convert.recipe import hash_directory, tool_versions
from edgellm.convert.runner import GGUFRunner
from edgellm.convert.verify import DEFAULT_PROMPTS, HFReference, compare_to_reference, model_reference
from edgellm.errors import EdgeLLMError
from edgellm.fsutil import atomic_path, atomic_write_text, sha256_file
from edgellm.gguf import GGUFError, GGUFHeader, read_header
from edgellm.manifest import (
    ADAPTERS_NAME,
    AdapterBase,
    AdapterManifest,
    AdapterVerification,
    LoraAdapter,
    ManifestError,
    PersonaProfile,
    ToolVersions,
    Verification,
    load_adapter_manifest,
    relative_to_folder,
)
from edgellm.paths import resolve_input
from edgellm.quants import ftype_name

log = logging.getLogger(__name__)

# Gate on the mean KL(merged hf || 16-bit base + adapter), nats per position, as the f16 round trip of a whole model
# (`convert.recipe.MAX_KL`). Measured with the Hammy adapter on SmolLM2-135M (f16 base, f16 adapter, 16 held-out
# conversations, 936 positions): mean 1.2e-5, p99 4.5e-5, top-1 agreement 0.999; the same adapter on the Q4_1 base
# that is served: mean 4.1e-3, p99 2.8e-2 (not gated; the Q4_1 base alone is 5.1e-3 from the same HF base). The gate
# leaves ~80x headroom for 16-bit rounding on larger models or a bf16 base (rounding 8x coarser than f16), while a
# broken conversion (one lora_b tensor with the wrong sign and scale, in tests/test_adapter_gguf.py) lands above it.
MAX_ADAPTER_KL = 1e-3
SIXTEEN_BIT = frozenset({"F32", "F16", "BF16"})


class AdapterError(ConvertError):
    """An adapter folder, or the base it is applied to, is not what a GGUF LoRA conversion needs."""


class AdapterVerificationError(AdapterError):
    """The base GGUF + adapter in llama.cpp does not reproduce the merged Hugging Face model."""


@dataclass(frozen=True)
class AdapterSource:
    """One PEFT adapter folder and where it came from."""

    name: str  # the dataset (persona) name
    folder: Path  # adapter_config.json + adapter_model.safetensors
    run: Path | None  # the train run folder (config.yaml, data/), when the adapter sits in one
    config: dict[str, Any]  # adapter_config.json
    persona: PersonaProfile | None = None  # the dataset's `persona:` block in the run's config.yaml

    @property
    def rank(self) -> int:
        return int(self.config["r"])

    @property
    def alpha(self) -> float:
        return float(self.config["lora_alpha"])

    @property
    def target_modules(self) -> list[str]:
        """Module kinds (``q_proj``, ...): PEFT stores ``all-linear`` resolved to full module paths."""
        modules = self.config.get("target_modules") or []
        return sorted({m.rsplit(".", 1)[-1] for m in ([modules] if isinstance(modules, str) else modules)})


# ---------------------------------------------------------------------------------------------------------------------
# Setup: the adapters, the bases


def find_adapters(source: Path) -> list[AdapterSource]:
    """``source`` is a PEFT adapter folder (``runs/<name>/adapter``), a run folder with ``adapter/`` or a
    multi-dataset run whose subfolders each have one."""
    source = resolve_input(source)
    if (source / "adapter_config.json").is_file():
        return [read_adapter(source)]
    from edgellm.train.merge import adapter_folders

    try:
        folders = adapter_folders(source)
    except EdgeLLMError as e:
        raise AdapterError(f"--lora {source}: no PEFT adapter here (adapter_config.json) nor a train run: {e}") from None
    return [read_adapter(folder / "adapter") for folder in folders]


def read_adapter(folder: Path) -> AdapterSource:
    """Read and check ``folder/adapter_config.json``: a LoRA that llama.cpp applies as PEFT does."""
    path = folder / "adapter_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapterError(f"{path}: missing; is {folder} a PEFT adapter folder?") from None
    except json.JSONDecodeError as e:
        raise AdapterError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{path}: not a JSON object")
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{path}: peft_type {config.get('peft_type')!r}; only LORA adapters convert to GGUF")
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), int | float):
            raise AdapterError(f"{path}: {key} is missing or not a number")
    unsupported = {
        "use_dora": "DoRA adapters",
        "use_rslora": "rank-stabilised LoRA (scale alpha/sqrt(r); llama.cpp scales by alpha/r)",
        "alpha_pattern": "per-module alphas (llama.cpp reads one alpha per adapter)",
        "modules_to_save": "fully trained modules (modules_to_save)",
    }
    for key, what in unsupported.items():
        if config.get(key):
            raise AdapterError(f"{path}: {key} is set; llama.cpp's GGUF LoRA cannot express {what}")
    check_weights(folder / "adapter_model.safetensors")
    run = folder.parent if (folder.parent / "config.yaml").is_file() and folder.name == "adapter" else None
    return AdapterSource(
        name=_adapter_name(folder, run), folder=folder.resolve(), run=run, config=config, persona=_run_persona(run)
    )


def check_weights(path: Path) -> None:
    """The adapter weights file is a readable safetensors file of LoRA A/B matrices (its header; no tensor read)."""
    import struct

    if not path.is_file():
        raise AdapterError(f"{path.parent}: no {path.name} (the adapter weights)")
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if not 0 < n <= size - 8:
                raise ValueError(f"header length {n} in a file of {size} bytes")
            header = json.loads(f.read(n))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError) as e:
        raise AdapterError(f"{path}: not a readable safetensors file ({e})") from None
    if 8 + n + end != size:
        raise AdapterError(f"{path}: truncated or padded: its header describes {8 + n + end} bytes, the file has {size}")
    names = [k for k in header if k != "__metadata__"]
    if not any(".lora_A." in k for k in names) or not any(".lora_B." in k for k in names):
        raise AdapterError(f"{path}: no lora_A / lora_B tensors in it; is this a LoRA adapter?")


def check_base_pair(base_hf: Path, base_gguf: Path) -> None:
    """``base_gguf`` holds the model whose Hugging Face folder is ``base_hf`` (width and depth agree): caught here,
    an adapter for another base is refused before anything is converted."""
    config = json.loads((base_hf / "config.json").read_text(encoding="utf-8"))
    config = config.get("text_config", config)
    header = _header(base_gguf)
    for hf_key, gguf_key in (("hidden_size", "embedding_length"), ("num_hidden_layers", "block_count")):
        theirs, ours = config.get(hf_key), header.arch_value(gguf_key)
        if theirs is not None and ours is not None and int(theirs) != int(ours):
            raise AdapterError(
                f"{base_gguf.name} is not a GGUF of the adapters' base {base_hf}: {gguf_key} {ours} in the GGUF, "
                f"{hf_key} {theirs} in its config.json (an adapter only applies to the base it was trained on)"
            )


def _adapter_name(folder: Path, run: Path | None) -> str:
    if run is not None:
        from edgellm.train.config import load_train_config

        return load_train_config(run / "config.yaml").datasets[0].name
    return folder.parent.name if folder.name == "adapter" else folder.name


def _run_persona(run: Path | None) -> PersonaProfile | None:
    """The ``persona:`` block of the run's dataset (its saved config.yaml), to serve the adapter as that persona."""
    if run is None:
        return None
    from edgellm.train.config import load_train_config

    spec = load_train_config(run / "config.yaml").datasets[0].persona
    return PersonaProfile.model_validate(spec.model_dump()) if spec is not None else None


def resolve_base_hf(explicit: Path | None, adapters: Sequence[AdapterSource]) -> Path:
    """The Hugging Face folder of the base the adapters were trained on: ``explicit``, else the ``base_model`` of
    their train runs (one for all), else ``base_model_name_or_path`` when it is a local folder. Never a hub id."""
    if explicit is not None:
        found = resolve_input(explicit)
    else:
        candidates = {_run_base(a) for a in adapters}
        if len(candidates) != 1:
            raise AdapterError(
                f"the adapters come from different bases ({', '.join(sorted(map(str, candidates)))}); "
                "convert them separately, each with its --base-gguf"
            )
        (only,) = candidates
        if only is None:
            raise AdapterError(
                f"{adapters[0].folder}: no train run around it names its base model; give the base's Hugging Face "
                "folder with --base (edgellm works offline: a hub id is not looked up)"
            )
        found = only
    if not (found / "config.json").is_file():
        raise AdapterError(f"{found}: no config.json; --base must be the base model's Hugging Face folder")
    return found.resolve()


def _run_base(adapter: AdapterSource) -> Path | None:
    if adapter.run is not None:
        from edgellm.train.config import load_train_config
        from edgellm.train.modeling import base_model_dir

        return Path(base_model_dir(load_train_config(adapter.run / "config.yaml").base_model)).resolve()
    named = adapter.config.get("base_model_name_or_path")
    if isinstance(named, str) and (Path(named) / "config.json").is_file():
        return Path(named).resolve()
    return None


def describe_gguf(path: Path, manifest_dir: Path | None) -> AdapterBase:
    """The record of a base GGUF (``path`` relative to ``manifest_dir``; empty for a temporary file)."""
    info = read_gguf(path)
    header = read_header(path)
    kind = ftype_name(header.file_type) if header.file_type is not None else None
    major = max(info.tensor_types.items(), key=lambda kv: kv[1])[0] if info.tensor_types else "?"
    return AdapterBase(
        path=relative_to_folder(path, manifest_dir) if manifest_dir is not None else "",
        file_name=path.name,
        sha256=sha256_file(path),
        size=path.stat().st_size,
        architecture=info.architecture,
        file_type=kind or major,
    )


@contextmanager
def sixteen_bit_base(
    base_gguf: Path, base_hf: Path, reference_gguf: Path | None, converter: Converter
) -> Iterator[Path]:
    """A 16-bit (or 32-bit) GGUF of the base for the gate: ``base_gguf`` itself when it is one, ``reference_gguf``
    when given, else converted from ``base_hf`` by llama.cpp's converter into a temporary folder (deleted after)."""
    if _is_sixteen_bit(base_gguf):
        yield base_gguf
        return
    if reference_gguf is not None:
        reference_gguf = resolve_input(reference_gguf)
        if not _is_sixteen_bit(reference_gguf):
            raise AdapterError(f"{reference_gguf}: --reference-gguf must be an f16, bf16 or f32 GGUF of the base")
        same_model(base_gguf, reference_gguf)
        yield reference_gguf
        return
    with tempfile.TemporaryDirectory(prefix="edgellm-lora-base-") as tmp:
        dst = Path(tmp) / f"{base_hf.name}-f16.gguf"
        log.info("%s is quantized; converting %s to f16 for the adapter check", base_gguf.name, base_hf)
        run_converter(converter, base_hf, dst, "f16")
        same_model(base_gguf, dst)
        yield dst


def _is_sixteen_bit(path: Path) -> bool:
    header = _header(path)
    kind = ftype_name(header.file_type) if header.file_type is not None else None
    if kind is not None:
        return kind.upper() in SIXTEEN_BIT
    types = {t.type for t in header.tensors}
    return types <= {0, 1, 30}  # F32, F16, BF16


def _header(path: Path) -> GGUFHeader:
    if not path.is_file():
        raise AdapterError(f"{path}: no such GGUF file")
    try:
        return read_header(path)
    except GGUFError as e:
        raise AdapterError(str(e)) from None


def same_model(a: Path, b: Path) -> None:
    """``a`` and ``b`` hold the same architecture, tensors and shapes (a quantized file and its 16-bit source)."""
    ha, hb = _header(a), _header(b)
    if ha.architecture != hb.architecture:
        raise AdapterError(f"{a.name} ({ha.architecture}) and {b.name} ({hb.architecture}) are different models")
    sa, sb = {t.name: t.dims for t in ha.tensors}, {t.name: t.dims for t in hb.tensors}
    if sa != sb:
        diff = sorted(set(sa.items()) ^ set(sb.items()))[:3]
        raise AdapterError(f"{a.name} and {b.name} are different models: their tensors differ ({diff} ...)")


# ---------------------------------------------------------------------------------------------------------------------
# One adapter: convert -> fits the base -> verify


def check_fits(adapter_gguf: Path, base_gguf: Path, source: Path) -> tuple[int, int]:
    """The converted file is a LoRA adapter for ``base_gguf``: same architecture, and each ``X.lora_a`` /
    ``X.lora_b`` pair multiplies a tensor ``X`` of the base with matching shapes. Returns (tensors, parameters)."""
    adapter, base = _header(adapter_gguf), _header(base_gguf)
    if adapter.meta.get("general.type") != "adapter" or adapter.meta.get("adapter.type") != "lora":
        raise AdapterError(f"{adapter_gguf.name} (from {source}) is not a GGUF LoRA adapter")
    if adapter.architecture != base.architecture:
        raise AdapterError(
            f"the adapter {source} is for a {adapter.architecture} model; {base_gguf.name} is {base.architecture}"
        )
    shapes = {t.name: t.dims for t in base.tensors}
    pairs: dict[str, dict[str, tuple[int, ...]]] = {}
    for t in adapter.tensors:
        target, _, part = t.name.rpartition(".")
        if part in ("lora_a", "lora_b"):
            pairs.setdefault(target, {})[part] = t.dims
    for target, pair in sorted(pairs.items()):
        if target not in shapes:
            raise AdapterError(f"the adapter {source} changes {target}, which {base_gguf.name} does not have")
        a, b, w = pair.get("lora_a"), pair.get("lora_b"), shapes[target]
        # ggml dims: W [n_in, n_out], lora_a [n_in, r], lora_b [r, n_out]
        if a is None or b is None or a[0] != w[0] or b[1] != w[1] or a[1] != b[0]:
            raise AdapterError(
                f"the adapter {source} does not fit {base_gguf.name}: {target} is {list(w)} in the base, the "
                f"adapter's A and B are {list(a or ())} and {list(b or ())} (trained on another base model?)"
            )
    return len(adapter.tensors), sum(t.n_elements for t in adapter.tensors)


def held_out_texts(run: Path | None, tokenizer: Any, max_prompts: int) -> list[str]:
    """Chat-formatted held-out text of the adapter's train run: test-split conversations with their reference answer
    (the positions where the adapter moves the distribution most) alternating with the extra prompts file's
    prompts; the generic round-trip prompts when the adapter has no run."""
    if run is None:
        return list(DEFAULT_PROMPTS)
    from edgellm.train import data as D
    from edgellm.train.behaviour import held_out_prompts
    from edgellm.train.config import load_train_config

    config = load_train_config(run / "config.yaml")
    test = D.read_split(run / "data")["test"] if (run / "data").is_dir() else []
    conversations = [tokenizer.apply_chat_template(ex.as_messages(), tokenize=False) for ex in test]
    extra = [
        tokenizer.apply_chat_template(p["messages"], tokenize=False, add_generation_prompt=True)
        for p in held_out_prompts(config.eval.model_copy(update={"use_test_split": False}), [])
    ]
    mixed = [t for pair in zip(conversations, extra, strict=False) for t in pair]
    longer = conversations if len(conversations) > len(extra) else extra
    mixed += longer[min(len(conversations), len(extra)) :]
    return mixed[:max_prompts] or list(DEFAULT_PROMPTS)


def merged_reference(base_hf: Path, adapter: Path, prompts: Sequence[str]) -> HFReference:
    """Next-token log-probabilities of the Hugging Face base with the adapter merged in (float32)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_hf)
    model = AutoModelForCausalLM.from_pretrained(base_hf, dtype=torch.float32)
    try:
        merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    except (RuntimeError, ValueError, KeyError) as e:
        raise AdapterError(f"{adapter} does not load on the base {base_hf}: {str(e).splitlines()[0]}") from None
    reference = model_reference(merged, tokenizer, prompts)
    del model, merged
    return reference


def verify_adapter(
    adapter_gguf: Path,
    base_gguf: Path,
    reference: HFReference,
    max_kl: float | None = None,
    n_threads: int | None = None,
    label: str | None = None,
) -> Verification:
    """``base_gguf`` + ``adapter_gguf`` in llama.cpp against ``reference`` (the merged model): KL per position, a
    greedy answer; with ``max_kl``, a mean KL at or above it raises `AdapterVerificationError`."""
    label = label or f"{base_gguf.name} + {adapter_gguf.name}"
    n_ctx = max([256, *(len(ids) + 8 for ids in reference.token_ids)])
    with GGUFRunner(base_gguf, n_ctx=n_ctx, n_threads=n_threads, lora=[(adapter_gguf, 1.0)]) as model:
        result = Verification(loads=True)
        compare_to_reference(model, reference, result, label)
        result.kl_threshold = max_kl
        if max_kl is not None and not result.tokenizer_matches_hf:
            raise AdapterVerificationError(f"{label}: the base GGUF's tokenizer does not match the Hugging Face base's")
        if max_kl is not None and not (result.kl_mean or 0.0) < max_kl:
            raise AdapterVerificationError(
                f"{label} does not reproduce the merged model: mean KL divergence {result.kl_mean:.3g} (p99 "
                f"{result.kl_p99:.3g}, max {result.kl_max:.3g}) over {result.n_positions} positions, threshold "
                f"{max_kl:g}; the adapter file was not kept"
            )
        if "tokenizer.chat_template" in model.metadata:
            result.prompt = "What is the capital of France?"
            answer = model.chat([{"role": "user", "content": result.prompt}], max_tokens=24)
            result.greedy_text = answer.text
    return result


def convert_adapter(
    source: AdapterSource,
    *,
    converter: Converter,
    base_hf: Path,
    base_gguf: Path,
    reference_gguf: Path,
    out: Path,
    outtype: str,
    max_kl: float,
    max_prompts: int,
    threads: int | None,
) -> LoraAdapter:
    """Convert, check and verify one adapter into ``out/<name>-lora-<outtype>.gguf``; nothing is kept on failure."""
    final = out / f"{source.name}-lora-{outtype}.gguf"
    with atomic_path(final, suffix=".gguf") as tmp:
        run_lora_converter(converter, source.folder, base_hf, tmp, outtype)
        n_tensors, n_params = check_fits(tmp, reference_gguf, source.folder)
        if base_gguf != reference_gguf:
            check_fits(tmp, base_gguf, source.folder)
        from transformers import AutoTokenizer

        prompts = held_out_texts(source.run, AutoTokenizer.from_pretrained(base_hf), max_prompts)
        reference = merged_reference(base_hf, source.folder, prompts)
        gate = verify_adapter(tmp, reference_gguf, reference, max_kl, threads, f"{source.name} on {reference_gguf.name}")
        served = None
        if base_gguf != reference_gguf:
            served = verify_adapter(tmp, base_gguf, reference, None, threads, f"{source.name} on {base_gguf.name}")
        record = LoraAdapter(
            name=source.name,
            path=final.name,
            size=tmp.stat().st_size,
            sha256=sha256_file(tmp),
            outtype=outtype,
            rank=source.rank,
            alpha=source.alpha,
            target_modules=source.target_modules,
            n_tensors=n_tensors,
            n_params=n_params,
            source=str(source.folder),
            source_sha256=hash_directory(source.folder),
            run=str(source.run.resolve()) if source.run is not None else None,
            verification=AdapterVerification(prompts=len(prompts), reference=gate, served=served),
            persona=source.persona,
        )
    log.info(
        "%s: %s (%.1f MB, r=%d, alpha=%g): KL vs merged mean %.2e p99 %.2e on %s%s",
        source.name,
        final.name,
        record.size / 1e6,
        record.rank,
        record.alpha,
        gate.kl_mean,
        gate.kl_p99,
        reference_gguf.name,
        f"; on {base_gguf.name} mean {served.kl_mean:.2e} p99 {served.kl_p99:.2e}" if served else "",
    )
    return record


# ---------------------------------------------------------------------------------------------------------------------
# The recipe


def convert_adapters(
    lora: Path,
    base_gguf: Path,
    out: Path,
    base_hf: Path | None = None,
    reference_gguf: Path | None = None,
    outtype: str = "f16",
    max_kl: float = MAX_ADAPTER_KL,
    max_prompts: int = 16,
    threads: int | None = None,
    force: bool = False,
) -> AdapterManifest:
    """Convert every PEFT adapter under ``lora`` into ``out/<name>-lora-<outtype>.gguf`` for ``base_gguf`` and record
    them in ``out/adapters.json`` (adapters already there for the same base are kept; an unchanged one is skipped
    unless ``force``). Each must reproduce the merged model on a 16-bit base (mean KL < ``max_kl``) or is refused."""
    # 1. Setup: the converter, the adapters, the bases, what an earlier run left.
    converter = require_converter()
    sources = find_adapters(lora)
    base_gguf = resolve_input(base_gguf).resolve()
    _header(base_gguf)
    base_hf = resolve_base_hf(base_hf, sources)
    check_base_pair(base_hf, base_gguf)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base = describe_gguf(base_gguf, out)
    tools = tool_versions(converter)
    previous = _previous(out, base, force)
    kept = {a.name: a for a in previous.adapters} if previous is not None else {}

    # 2. Each new or changed adapter: convert -> fits -> verify, against one 16-bit base (made only when needed).
    todo = []
    for source in sources:
        if not force and (same := _unchanged(kept.get(source.name), previous, source, tools, outtype)):
            log.info("%s: %s is up to date (same adapter, base and tools)", source.name, same.path)
            kept[source.name] = same.model_copy(update={"persona": source.persona})  # the run's profile as it is now
        else:
            todo.append(source)
    reference_record = previous.reference_base if previous is not None else base
    if todo:
        with sixteen_bit_base(base_gguf, base_hf, reference_gguf, converter) as reference:
            if reference != base_gguf:  # a path only for a file that stays (not one converted for this check)
                reference_record = describe_gguf(reference, out if reference_gguf is not None else None)
            for source in todo:
                kept[source.name] = convert_adapter(
                    source,
                    converter=converter,
                    base_hf=base_hf,
                    base_gguf=base_gguf,
                    reference_gguf=reference,
                    out=out,
                    outtype=outtype,
                    max_kl=max_kl,
                    max_prompts=max_prompts,
                    threads=threads,
                )

    # 3. The manifest, written atomically.
    manifest = AdapterManifest(
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        base=base,
        base_hf=str(base_hf),
        reference_base=reference_record,
        tools=tools,
        adapters=sorted(kept.values(), key=lambda a: a.name),
    )
    atomic_write_text(out / ADAPTERS_NAME, manifest.to_json())
    return load_adapter_manifest(out / ADAPTERS_NAME)


def _previous(out: Path, base: AdapterBase, force: bool) -> AdapterManifest | None:
    """The adapters an earlier run recorded in ``out`` for the same base; another base's are an error (or, with
    ``force``, dropped)."""
    if not (out / ADAPTERS_NAME).is_file():
        return None
    try:
        previous = load_adapter_manifest(out / ADAPTERS_NAME)
    except ManifestError as e:
        log.warning("ignoring the previous adapter manifest: %s", e)
        return None
    if previous.base.sha256 != base.sha256:
        if force:
            log.warning("%s lists adapters for another base (%s); --force drops them", out, previous.base.file_name)
            return None
        raise AdapterError(
            f"{out / ADAPTERS_NAME} lists adapters for the base {previous.base.file_name} (sha256 "
            f"{previous.base.sha256[:12]}), not {base.file_name}; use another --out folder, or --force to start over"
        )
    return previous


def _unchanged(
    entry: LoraAdapter | None,
    previous: AdapterManifest | None,
    source: AdapterSource,
    tools: ToolVersions,
    outtype: str,
) -> LoraAdapter | None:
    if entry is None or previous is None or previous.tools != tools or entry.outtype != outtype:
        return None
    path = entry.absolute_path
    if not path.is_file() or sha256_file(path) != entry.sha256:
        return None
    return entry if entry.source_sha256 == hash_directory(source.folder) else None
