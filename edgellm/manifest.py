"""``models/<name>/manifest.json``: what `edgellm convert` wrote, read by `serve` and `bench`.

Stdlib and pydantic only (the server imports this module; it must not pull in torch or llama_cpp).

    manifest = load_manifest(Path("models/demo/manifest.json"))
    for f in manifest.files:                      # the variants to serve, e.g. q4_k_m and q8_0
        manifest.model_id(f)                      # "demo:q4_k_m"
        f.absolute_path                           # models/demo/demo-q4_k_m.gguf (absolute)
        f.quant, f.size, f.sha256, f.bits_per_weight, f.tensor_types

``models/<name>/adapters.json``: LoRA adapters `edgellm convert --lora` wrote for one base GGUF, read by `serve`.

    adapters = load_adapter_manifest(Path("models/personas"))
    adapters.base.absolute_path                   # the base GGUF they apply to (sha256 checked by `check_files`)
    for a in adapters.adapters:                   # hammy, steps, owl
        a.name, a.absolute_path, a.rank, a.alpha, a.target_modules, a.verification.reference.kl_mean
        a.persona                                 # PersonaProfile (system prompt, limits, triggers) or None
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from edgellm.errors import EdgeLLMError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
ADAPTERS_NAME = "adapters.json"


class ManifestError(EdgeLLMError):
    """A manifest is missing, unreadable or does not match the files next to it."""


class Verification(BaseModel):
    """What was checked on one GGUF file right after it was written."""

    model_config = ConfigDict(extra="ignore")

    loads: bool
    prompt: str = ""
    greedy_text: str = ""
    tokenizer_matches_hf: bool | None = None
    # Next-token distributions against the Hugging Face source model (float32), over every position of a few prompts.
    kl_mean: float | None = None
    kl_max: float | None = None
    kl_p99: float | None = None
    top1_agreement: float | None = None
    n_positions: int = 0
    kl_threshold: float | None = None  # set when the check was a pass/fail gate (the 16-bit reference file)


class ManifestFile(BaseModel):
    """One GGUF file in the manifest's folder."""

    model_config = ConfigDict(extra="ignore")

    quant: str  # requested type: "q4_k_m", "q8_0", "f16", ...
    path: str  # file name relative to the manifest's folder
    size: int
    sha256: str
    n_params: int
    bits_per_weight: float  # tensor data bits / parameters, as llama.cpp reports BPW
    # Histogram of the tensor types actually written (gguf names: "Q4_K", "Q5_0", "F32", ...).
    tensor_types: dict[str, int]
    # K-quant fallbacks llama.cpp made, "wanted->used": count (e.g. {"Q4_K->Q5_0": 150}); empty when none.
    fallbacks: dict[str, int] = Field(default_factory=dict)
    architecture: str = ""
    context_length: int | None = None
    has_chat_template: bool = False
    # Importance matrix the quantizer used: sha256 of the calibration text and its token count (None: no imatrix).
    imatrix_text_sha256: str | None = None
    imatrix_tokens: int = 0
    verification: Verification | None = None

    _root: Path | None = PrivateAttr(default=None)

    @property
    def absolute_path(self) -> Path:
        """The file's absolute path (only for a file that belongs to a loaded or saved manifest)."""
        if self._root is None:
            raise ManifestError(f"{self.path}: not attached to a manifest folder (use load_manifest)")
        return (self._root / self.path).resolve()


class SourceInfo(BaseModel):
    model_config = ConfigDict(extra="ignore")

    path: str
    sha256: str  # over every file of the directory: sha256 of "relative/path\0<file sha256>\n" lines, sorted
    architecture: str
    n_params: int


class ToolVersions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    llama_cpp_python: str
    llama_cpp: str  # llama_version() of the binding's build
    gguf_py: str  # version of the gguf-py that ships with the converter
    converter_sdist_sha256: str  # the llama-cpp-python source distribution the converter came from


class Manifest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    schema_version: int = SCHEMA_VERSION
    name: str
    created_at: str
    source: SourceInfo
    tools: ToolVersions
    # The 16-bit file straight from llama.cpp's converter; every quantized file is made from it.
    reference: ManifestFile
    # The variants to serve, in the order requested; each is served as "<name>:<quant>".
    files: list[ManifestFile]

    _root: Path | None = PrivateAttr(default=None)

    @property
    def root(self) -> Path:
        if self._root is None:
            raise ManifestError(f"manifest {self.name!r} is not attached to a folder")
        return self._root

    def attach(self, root: Path) -> Manifest:
        """Resolve file paths relative to ``root`` (the manifest's folder)."""
        self._root = Path(root).resolve()
        for f in (self.reference, *self.files):
            f._root = self._root
        return self

    def model_id(self, f: ManifestFile) -> str:
        return f"{self.name}:{f.quant}"

    def variant(self, quant: str) -> ManifestFile:
        for f in self.files:
            if f.quant == quant:
                return f
        raise ManifestError(
            f"manifest {self.name!r} has no {quant!r} variant; it has {[f.quant for f in self.files]}"
        )

    def check_files(self) -> None:
        """Cheap integrity check (present, recorded size); hashing is left to `verify_sha256`."""
        for f in (self.reference, *self.files):
            p = f.absolute_path
            if not p.is_file():
                raise ManifestError(f"{p}: listed in the manifest of {self.name!r} but missing")
            if p.stat().st_size != f.size:
                raise ManifestError(f"{p}: size {p.stat().st_size} differs from the manifest's {f.size}")

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2) + "\n"


def load_manifest(path: Path) -> Manifest:
    """Read ``models/<name>/manifest.json`` (or its folder); file paths resolve against that folder."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"{path}: no manifest here (run `edgellm convert` first)") from None
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    if isinstance(data, dict) and data.get("schema_version", SCHEMA_VERSION) > SCHEMA_VERSION:
        raise ManifestError(
            f"{path}: schema_version {data['schema_version']} is newer than this edgellm reads"
        )
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        key = ".".join(str(p) for p in first["loc"]) or "<root>"
        raise ManifestError(f"{path}: {key}: {first['msg']} ({e.error_count()} error(s))") from None
    return manifest.attach(path.parent)


# ---------------------------------------------------------------------------------------------------------------------
# LoRA adapters for one base GGUF


class AdapterBase(BaseModel):
    """A GGUF file the adapters are applied to (or were checked against)."""

    model_config = ConfigDict(extra="ignore")

    path: str  # relative to the adapter manifest's folder (may start with ../); empty for a temporary file
    file_name: str
    sha256: str
    size: int
    architecture: str
    file_type: str  # llama.cpp's type of most tensors: "Q4_1", "F16", ...

    _root: Path | None = PrivateAttr(default=None)

    @property
    def absolute_path(self) -> Path:
        if self._root is None or not self.path:
            raise ManifestError(f"{self.file_name}: not a file attached to an adapter manifest folder")
        return (self._root / self.path).resolve()


class AdapterVerification(BaseModel):
    """Base GGUF + adapter in llama.cpp against the Hugging Face base with the adapter merged in (float32)."""

    model_config = ConfigDict(extra="ignore")

    prompts: int  # held-out conversations scored (every position of each)
    reference: Verification  # on a 16-bit GGUF of the base: the pass/fail gate (kl_threshold)
    served: Verification | None = None  # on the base GGUF in the manifest, when that is another (quantized) file


class PersonaProfile(BaseModel):
    """How an adapter is served as a persona: its system prompt, limits, phrase filter and routing hints. Written in
    the train recipe (a dataset's ``persona:`` block, `edgellm.train.config.PersonaSpec`), carried by `edgellm
    convert --lora` into ``adapters.json`` and read by `serve` (the fields of ``serve.settings.PersonaSettings``)."""

    model_config = ConfigDict(extra="ignore")

    system_prompt: str | None = Field(None, description="put before the conversation's own system message")
    max_tokens: int | None = Field(None, ge=1, description="cap on the answer's tokens (finish_reason 'length')")
    max_words: int | None = Field(
        None, ge=1, description="cap on the answer's words: it stops at a word boundary (finish_reason 'length')"
    )
    forbidden_phrases: list[str] = Field(
        default_factory=list, description="removed from the answer, also when split across tokens and chunks"
    )
    triggers: list[str] = Field(default_factory=list, description="keywords that route a message to this persona")
    description: str | None = Field(None, description="what the persona is for (shown in /v1/models; routing)")

    @field_validator("forbidden_phrases", "triggers")
    @classmethod
    def _no_empty_strings(cls, values: list[str]) -> list[str]:
        if any(not v.strip() for v in values):
            raise ValueError("empty strings are not allowed")
        return values


class LoraAdapter(BaseModel):
    """One PEFT LoRA adapter converted by llama.cpp's ``convert_lora_to_gguf.py``."""

    model_config = ConfigDict(extra="ignore")

    name: str  # the dataset (persona) it was trained on
    path: str  # file name relative to the manifest's folder
    size: int
    sha256: str
    outtype: str  # type of the lora_a / lora_b tensors: "f16", "f32", ...
    rank: int
    alpha: float
    scale: float = 1.0  # scale to apply with (llama.cpp multiplies alpha / rank by it, as PEFT does)
    target_modules: list[str]
    n_tensors: int
    n_params: int
    source: str  # the PEFT adapter folder
    source_sha256: str  # over adapter_config.json and the adapter weights (`sha256_dir`-style lines)
    run: str | None = None  # the train run folder (config.yaml, data/) it came from
    verification: AdapterVerification
    persona: PersonaProfile | None = None  # the dataset's `persona:` block in the train recipe, if it has one

    _root: Path | None = PrivateAttr(default=None)

    @property
    def absolute_path(self) -> Path:
        if self._root is None:
            raise ManifestError(f"{self.path}: not attached to an adapter manifest folder (use load_adapter_manifest)")
        return (self._root / self.path).resolve()


class AdapterManifest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    schema_version: int = SCHEMA_VERSION
    kind: Literal["lora-adapters"] = "lora-adapters"
    created_at: str
    base: AdapterBase  # the GGUF every adapter here applies to (the one to serve them on)
    base_hf: str  # the Hugging Face folder of the same base (its config.json told the converter the shapes)
    reference_base: AdapterBase  # the 16-bit GGUF of the base the gate ran on (may be `base` itself)
    tools: ToolVersions
    adapters: list[LoraAdapter]

    _root: Path | None = PrivateAttr(default=None)

    @property
    def root(self) -> Path:
        if self._root is None:
            raise ManifestError("adapter manifest is not attached to a folder")
        return self._root

    def attach(self, root: Path) -> AdapterManifest:
        self._root = Path(root).resolve()
        files: list[AdapterBase | LoraAdapter] = [self.base, self.reference_base, *self.adapters]
        for f in files:
            f._root = self._root
        return self

    def adapter(self, name: str) -> LoraAdapter:
        for a in self.adapters:
            if a.name == name:
                return a
        raise ManifestError(f"no adapter {name!r} in {self.root / ADAPTERS_NAME}; it has {[a.name for a in self.adapters]}")

    def check_files(self) -> None:
        """Present with the recorded size: the base GGUF and every adapter."""
        files: list[AdapterBase | LoraAdapter] = [self.base, *self.adapters]
        for f in files:
            p = f.absolute_path
            if not p.is_file():
                raise ManifestError(f"{p}: listed in {self.root / ADAPTERS_NAME} but missing")
            if p.stat().st_size != f.size:
                raise ManifestError(f"{p}: size {p.stat().st_size} differs from the adapter manifest's {f.size}")

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2) + "\n"


def relative_to_folder(path: Path, folder: Path) -> str:
    """``path`` as a manifest records it: relative to the manifest's ``folder`` (``../x.gguf`` when outside)."""
    return os.path.relpath(Path(path).resolve(), Path(folder).resolve())


def load_adapter_manifest(path: Path) -> AdapterManifest:
    """Read ``<folder>/adapters.json`` (or the folder); paths resolve against that folder."""
    path = Path(path)
    if path.is_dir():
        path = path / ADAPTERS_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"{path}: no adapter manifest here (run `edgellm convert --lora` first)") from None
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    if isinstance(data, dict) and data.get("schema_version", SCHEMA_VERSION) > SCHEMA_VERSION:
        raise ManifestError(f"{path}: schema_version {data['schema_version']} is newer than this edgellm reads")
    try:
        manifest = AdapterManifest.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        key = ".".join(str(p) for p in first["loc"]) or "<root>"
        raise ManifestError(f"{path}: {key}: {first['msg']} ({e.error_count()} error(s))") from None
    return manifest.attach(path.parent)
