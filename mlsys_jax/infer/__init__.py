"""mlsys_jax.infer: inference-time transforms of a trained model.

Each system lives in its own module and is imported from it:

- ``mlsys_jax.infer.sensai``: sensAI class-parallel subnets (Wang et al., MLSys 2021).
"""
