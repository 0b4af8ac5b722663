"""Silence megatron-core log notices that do not apply to how this project calls it.

* 0.19 warns "GPTModel IS DEPRECATED" for every model built; we build GPTModel knowingly
  (see models/builder.py).
* a synchronous ``dist_checkpointing.save`` goes through the "mcore" async path internally
  and warns that *async* save is deprecated, although nothing async was asked for.
* torch logs "No CUDA runtime is found" on CPU machines when megatron-core imports
  torch.utils.cpp_extension; nothing here builds CUDA extensions.
* torch.distributed.checkpoint, used by megatron-core's torch_dist format, warns about its
  own ShardedTensor deprecation and argument order on every save/load.
"""

import logging
import warnings

_NOTICES = {
    "megatron.core.models.gpt.gpt_model": "GPTModel IS DEPRECATED",
    "megatron.core.dist_checkpointing.strategies.torch": "MCore's async save is deprecated",
    "torch.utils.cpp_extension": "No CUDA runtime is found",
}
_TORCH_DCP_WARNINGS = (
    "Please use DTensor instead and we are deprecating ShardedTensor",
    "The argument order of load has been changed",
    "torch.distributed is disabled, unavailable or uninitialized",
)


class _DropNotice(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


for _logger, _text in _NOTICES.items():
    logging.getLogger(_logger).addFilter(_DropNotice(_text))
for _text in _TORCH_DCP_WARNINGS:
    warnings.filterwarnings("ignore", message=_text)
