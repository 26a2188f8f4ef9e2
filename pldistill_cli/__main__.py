"""`python -m pldistill_cli ...`, which is also what torchrun and `accelerate launch` start:
`torchrun --nproc-per-node 4 -m pldistill_cli distill --dataset iemocap --fold 1`."""

from .cli import main

main()
