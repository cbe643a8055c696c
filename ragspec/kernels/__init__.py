"""ragspec's own CPU kernels and the choice between them and the plain ops they replace.

`linear` (oneDNN-prepacked linear weights) and `attention` (matmul attention for short query
blocks) are the fast paths; `probe` checks what this CPU and torch build run; `select` probes,
times and applies the choice for a loaded model; `info` reports it (`ragspec info`).
Submodules are imported where used (`attention` needs transformers).
"""
