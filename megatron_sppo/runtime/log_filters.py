"""Silence megatron-core log notices that do not apply to how this project calls it.

* 0.19 warns "GPTModel IS DEPRECATED" for every model built; we build GPTModel knowingly
  (see models/builder.py).
* a synchronous ``dist_checkpointing.save`` goes through the "mcore" async path internally
  and warns that *async* save is deprecated, although nothing async was asked for.
"""

import logging

_NOTICES = {
    "megatron.core.models.gpt.gpt_model": "GPTModel IS DEPRECATED",
    "megatron.core.dist_checkpointing.strategies.torch": "MCore's async save is deprecated",
}


class _DropNotice(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


for _logger, _text in _NOTICES.items():
    logging.getLogger(_logger).addFilter(_DropNotice(_text))
