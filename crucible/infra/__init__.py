"""Infrastructure checks: `crucible bench ...` measurements and the `crucible doctor` report.

Every figure a measurement is compared with comes from `crucible.plan.hardware`; this package only
measures. Modules: timing (the timer), results (tables + JSON), kernels (matmul, copies),
collectives (torch.distributed, nccl-tests conventions), storage (read throughput, checkpoint
round trip), dataload (PretrainLoader tokens/s), doctor (environment + health), commands (CLI).
"""
