"""launch.cluster_env: SLURM task variables -> torch.distributed variables."""

import pytest

from launch.cluster_env import (
    PORT_BASE,
    PORT_SPAN,
    SlurmEnvError,
    expand_nodelist,
    master_port,
    tasks_per_node,
    torch_dist_env,
)


def slurm_env(**over):
    """Rank 3 of a 2-node x 2-task job, as srun sets it on the second node."""
    env = {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "n[1-2]",
        "SLURM_PROCID": "3",
        "SLURM_LOCALID": "1",
        "SLURM_NTASKS": "4",
        "SLURM_NODEID": "1",
        "SLURM_TASKS_PER_NODE": "2(x2)",
    }
    env.update(over)
    return env


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("n1", ["n1"]),
        ("n[1-2]", ["n1", "n2"]),
        ("gpu[008-010,012]", ["gpu008", "gpu009", "gpu010", "gpu012"]),
        ("a[1-2],b7,c[3]", ["a1", "a2", "b7", "c3"]),
        ("node-[1,3]-ib", ["node-1-ib", "node-3-ib"]),
        ("r[1-2]-n[1-2]", ["r1-n1", "r1-n2", "r2-n1", "r2-n2"]),
        ("host.example.org", ["host.example.org"]),
    ],
)
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["", "n[1-2", "n]1[", "n[2-1]", "n[a-b]", "n1,,n2", "n[]"])
def test_expand_nodelist_rejects_malformed(bad):
    with pytest.raises(SlurmEnvError):
        expand_nodelist(bad)


def test_tasks_per_node():
    assert tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert tasks_per_node("8") == [8]
    with pytest.raises(SlurmEnvError, match="SLURM_TASKS_PER_NODE"):
        tasks_per_node("2(3)")


def test_two_nodes_two_tasks_each():
    assert torch_dist_env(slurm_env()) == {
        "MASTER_ADDR": "n1",
        "MASTER_PORT": str(PORT_BASE + 4242),
        "RANK": "3",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "4",
        "LOCAL_WORLD_SIZE": "2",
    }


def test_every_task_of_a_job_agrees_on_the_master():
    envs = [
        torch_dist_env(slurm_env(SLURM_PROCID=str(r), SLURM_LOCALID=str(r % 2), SLURM_NODEID=str(r // 2)))
        for r in range(4)
    ]
    assert {(e["MASTER_ADDR"], e["MASTER_PORT"]) for e in envs} == {("n1", str(PORT_BASE + 4242))}
    assert [e["RANK"] for e in envs] == ["0", "1", "2", "3"]
    assert [e["LOCAL_RANK"] for e in envs] == ["0", "1", "0", "1"]


def test_uneven_tasks_per_node():
    env = slurm_env(
        SLURM_JOB_NODELIST="gpu[01-03]", SLURM_NTASKS="5", SLURM_TASKS_PER_NODE="2(x2),1",
        SLURM_NODEID="2", SLURM_PROCID="4", SLURM_LOCALID="0",
    )
    out = torch_dist_env(env)
    assert (out["MASTER_ADDR"], out["LOCAL_WORLD_SIZE"], out["WORLD_SIZE"]) == ("gpu01", "1", "5")


def test_without_tasks_per_node_assumes_an_even_split():
    env = slurm_env()
    del env["SLURM_TASKS_PER_NODE"]
    assert torch_dist_env(env)["LOCAL_WORLD_SIZE"] == "2"


def test_master_port_is_in_range_and_stable():
    ports = {master_port(j) for j in range(1, 3 * PORT_SPAN, 7)}
    assert min(ports) >= PORT_BASE and max(ports) < PORT_BASE + PORT_SPAN
    assert master_port("123") == master_port(123) == PORT_BASE + 123
    assert master_port(1) != master_port(2)


def test_missing_variables_are_named():
    env = slurm_env()
    del env["SLURM_PROCID"], env["SLURM_NTASKS"]
    with pytest.raises(SlurmEnvError, match="SLURM_PROCID, SLURM_NTASKS"):
        torch_dist_env(env)


def test_bad_values_are_named():
    with pytest.raises(SlurmEnvError, match="SLURM_PROCID='x'"):
        torch_dist_env(slurm_env(SLURM_PROCID="x"))
    with pytest.raises(SlurmEnvError, match="SLURM_PROCID=4 outside"):
        torch_dist_env(slurm_env(SLURM_PROCID="4"))
