"""qinco-jax: QINCo2 neural vector compression and search in JAX/Flax.

    import qinco_jax as qj
    cfg = qj.preset("qinco2-S", M=8)
    codec = qj.Codec.create(cfg, train_x)
    codes = codec.encode(x, A=16, B=32)
    x_hat = codec.decode(codes)
"""

from qinco_jax import data, distributed, metrics
from qinco_jax.codec import Codec, load
from qinco_jax.config import PRESETS, QincoConfig, preset

__version__ = "0.1.0"

__all__ = ["Codec", "Index", "load", "load_index", "preset", "PRESETS", "QincoConfig",
           "data", "distributed", "metrics"]
from qinco_jax import interop, plots  # noqa: E402,F401  (reference checkpoints, faiss, npz; plots)
from qinco_jax.ann import Index, load_index  # noqa: E402  (faiss-style search index)
