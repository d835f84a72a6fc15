"""CaraServe's cluster side: the API front end, the instance launcher, the rank-aware
scheduler (PerfModel, policies, scheduler state), workloads and the cluster simulator.
Kept free of heavy imports: import the submodule you need."""
from . import _kernels_home

_kernels_home.install()
