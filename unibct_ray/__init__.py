"""unibct-ray: distributed training and evaluation of backward-compatible embeddings on Ray.

The core (``unibct_ray.data``, ``models``, ``compat``, ``metrics``) never imports ray;
``unibct_ray.distributed`` is the only package that does.
"""

__version__ = "0.1.0"
