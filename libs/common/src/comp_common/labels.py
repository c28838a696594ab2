"""Labels COMP puts on every container it starts.

They let a restarted agent adopt what it finds instead of starting duplicates, and
let ``comp down`` find a cluster's containers on a shared engine.
"""

CLUSTER = "comp.cluster"
NODE = "comp.node"
TASK_ID = "comp.task_id"
DEPLOYMENT = "comp.deployment"
SPEC_HASH = "comp.spec_hash"
