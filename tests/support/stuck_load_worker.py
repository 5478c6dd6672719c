"""A real worker (Kafka, engine, adapter cache) whose disk reads of adapters named `stuck-*`
never return, as on storage that stopped answering: the fault the load deadline and SIGTERM's
drain must survive. Run as `python stuck_load_worker.py WORKER_ID LOAD_TIMEOUT_S` with the
stack's environment."""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
from pathlib import Path
from typing import Any

import torch

from inference import adapter_cache
from inference.worker.backend import BackendConfig
from inference.worker.service import WorkerConfig, run_worker
from inference.worker.sketching import SketchMode, SketchPolicy
from infra.settings import load_settings

log = logging.getLogger("loraledger.worker")


def _inject_stuck_reads() -> None:
    read = adapter_cache.load_peft_adapter

    def read_or_hang(directory: Path, *args: Any, **kwargs: Any) -> Any:
        if Path(directory).name.startswith("stuck-"):
            log.info("stuck read of %s began", Path(directory).name)
            threading.Event().wait()  # never set
        return read(directory, *args, **kwargs)

    adapter_cache.load_peft_adapter = read_or_hang


def main(worker_id: str, load_timeout_s: float) -> None:
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    _inject_stuck_reads()
    config = WorkerConfig(
        worker_id=worker_id,
        backend=BackendConfig(max_batch=4, max_seq_len=128, adapter_load_timeout_s=load_timeout_s),
        sketch=SketchPolicy(SketchMode.OFF),
        session_timeout_ms=6000,
    )
    asyncio.run(run_worker(load_settings(), config))


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]))
