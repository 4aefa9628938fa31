"""qinco-jax: QINCo2 neural vector compression and search in JAX/Flax.

    import qinco_jax as qj
    cfg = qj.preset("qinco2-S", M=8)
    codec = qj.Codec.create(cfg, train_x)
    codes = codec.encode(x, A=16, B=32)
    x_hat = codec.decode(codes)
"""

__version__ = "0.1.0"

from qinco_jax import baselines, data, distributed, interop, ivf, metrics, plots  # noqa: E402
from qinco_jax.codec import Codec, load  # noqa: E402
from qinco_jax.config import PRESETS, QincoConfig, preset  # noqa: E402
from qinco_jax.search import Index, load_index  # noqa: E402
from qinco_jax.train import TrainConfig  # noqa: E402
from qinco_jax.trainer import train_and_evaluate  # noqa: E402

__all__ = [
    # the codec
    "Codec", "QincoConfig", "preset", "PRESETS", "load",
    # training
    "TrainConfig", "train_and_evaluate",
    # search
    "Index", "load_index",
    # modules: data sets and files, metrics, faiss baselines, plots, reference
    # checkpoints and faiss export, several processes
    "data", "metrics", "baselines", "plots", "interop", "distributed", "ivf", "search",
]
