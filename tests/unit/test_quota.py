import pytest
from pydantic import ValidationError

from comp_common.manifest import parse_deployments
from comp_common.quota import Quota, quota_violations, usage_after_apply, usage_of


def dep(name, replicas, cpu="100m", memory="64Mi"):
    return parse_deployments(
        f"metadata: {{name: {name}}}\nspec: {{replicas: {replicas}, image: x, resources: {{cpu: {cpu}, memory: {memory}}}}}"
    )[0]


@pytest.mark.parametrize(
    "quota, deployments, violations",
    [
        (Quota(), [dep("a", 100)], []),
        (Quota(cpu=1), [dep("a", 10)], []),  # 10 x 0.1 is exactly 1 core despite float sums
        (Quota(cpu=1), [dep("a", 11)], ["cpu 1.1 cores > quota 1"]),
        (Quota(memory="128Mi"), [dep("a", 2)], []),
        (Quota(memory="128Mi"), [dep("a", 3)], ["memory 192Mi > quota 128Mi"]),
        (Quota(tasks=3), [dep("a", 2), dep("b", 2)], ["tasks 4 > quota 3"]),
        (Quota(cpu=0.1, tasks=0), [dep("a", 1)], ["tasks 1 > quota 0"]),
        (Quota(cpu="50m", memory="1Mi", tasks=0), [dep("a", 1)], ["cpu 0.1 cores > quota 0.05", "memory 64Mi > quota 1Mi", "tasks 1 > quota 0"]),
    ],
)
def test_quota_violations(quota, deployments, violations):
    assert quota_violations(quota, usage_of(deployments)) == violations


def test_apply_replaces_deployments_of_the_same_name():
    usage = usage_after_apply([dep("a", 5), dep("b", 1)], [dep("a", 1)])
    assert usage.tasks == 2


@pytest.mark.parametrize("bad", [{"cpu": "lots"}, {"memory": "1Mb"}, {"tasks": -1}, {"gpus": 1}])
def test_bad_quota_is_rejected(bad):
    with pytest.raises(ValidationError):
        Quota.model_validate(bad)
