"""Run llama.cpp's own `convert_hf_to_gguf.py` on a checkpoint directory, unmodified except for
the name of the pre-tokenizer of tokenizers trained here (`scripts/train_tiny_lm.py`, the test
fixtures): the converter identifies pre-tokenizers by a hash of their output, which for a
freshly trained vocabulary is in none of its tables. Those tokenizers use GPT-2's byte-level
BPE pre-tokenizer, which llama.cpp calls `gpt-2`.

    python scripts/llama_cpp_convert.py LLAMA_CPP_TREE/convert_hf_to_gguf.py MODEL_DIR \\
        --outfile model.gguf --outtype f32
"""

import runpy
import sys
from pathlib import Path

converter = Path(sys.argv[1])
sys.path[:0] = [str(converter.parent), str(converter.parent / "gguf-py")]
from conversion import base  # noqa: E402  (llama.cpp's package, found through the path above)

base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sys.argv = [str(converter), *sys.argv[2:]]
runpy.run_path(str(converter), run_name="__main__")
