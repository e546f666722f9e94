"""llama.cpp's ``convert_hf_to_gguf.py`` with one model class replaced: ``BertForSequenceClassification`` keeps its
pooler. Run as ``python -m edgellm.convert.encoder_converter <converter root> <convert_hf_to_gguf.py arguments>``.

Upstream's ``BertModel`` drops ``pooler.dense`` ("we are only using BERT for embeddings"), but a BERT cross-encoder
scores ``classifier(tanh(pooler.dense(h_CLS)))``: without the pooler llama.cpp applies the classifier to the raw
``[CLS]`` state and the scores are another model's. llama.cpp's RANK pooling already has the layer, as the
``cls`` tensor (dense + tanh, RoBERTa's ``classifier.dense``), so the fix is upstream-style: the converter class maps
``pooler.dense`` to ``cls`` and records RANK pooling in the file (``<arch>.pooling_type``), so that llama.cpp and
llama-server know it is a reranker. Everything else is the converter as shipped with the pinned llama-cpp-python.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path
from typing import Any


def _register(root: Path) -> None:
    sys.path[:0] = [str(root), str(root / "gguf-py")]  # the converter's own gguf-py, as its script does
    import gguf
    from conversion import ModelBase
    from conversion.bert import BertModel

    @ModelBase.register("BertForSequenceClassification")
    class BertCrossEncoderModel(BertModel):
        model_arch = gguf.MODEL_ARCH.BERT

        def set_gguf_parameters(self) -> None:
            super().set_gguf_parameters()
            self.gguf_writer.add_pooling_type(gguf.PoolingType.RANK)

        @classmethod
        def filter_tensors(cls, item: tuple[str, Any]) -> tuple[str, Any] | None:
            name, gen = item
            bare = name.removeprefix("bert.")
            if bare in ("pooler.dense.weight", "pooler.dense.bias"):
                return "classifier.dense." + bare.rpartition(".")[2], gen  # -> cls.weight / cls.bias
            result: tuple[str, Any] | None = super().filter_tensors(item)
            return result


def main() -> None:
    root = Path(sys.argv.pop(1))
    _register(root)
    script = root / "convert_hf_to_gguf.py"
    sys.argv[0] = str(script)
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
