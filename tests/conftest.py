"""Shared test set-up: one inductor cache for every torch.compile test, quiet logs."""
import os
from pathlib import Path

# torch.compile costs ~30 s cold on this CPU and 2-4 s warm: share one cache across tests and runs
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(__file__).resolve().parent.parent / ".cache" / "inductor"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    # torch-pruning and torch_geometric call torch.jit.script, which this torch deprecates: their
    # warning, not ours (etp_fx itself never scripts)
    config.addinivalue_line(
        "filterwarnings", "ignore:`torch.jit.script` is deprecated:FutureWarning")
