"""Affinity policy (pure): where a job on a given model variant should run."""

from workers.affinity import Peer, pass_to


def peer(name, idle=True, resident=(), node="n1", backlog=0):
    return Peer(name, node, idle, frozenset(resident), backlog)


def test_runs_here_when_the_variant_is_resident_here():
    assert pass_to("v", {"v"}, "n1", [peer("b", resident={"v"})], set(), 0, 1) is None


def test_passes_to_an_idle_peer_holding_the_variant_in_vram():
    got = pass_to("v", {"other"}, "n1", [peer("a"), peer("b", resident={"v"})], set(), 0, 1)
    assert got is not None and got.worker == "b"


def test_an_interactive_job_never_waits_for_a_busy_peer():
    assert pass_to("v", set(), "n1", [peer("b", idle=False, resident={"v"})], set(), 0, 1, may_wait=False) is None


def test_other_jobs_wait_for_one_job_of_a_busy_holder_rather_than_load():
    busy = peer("b", idle=False, resident={"v"})
    assert pass_to("v", set(), "n1", [busy], set(), 0, 1, may_wait=True) == busy
    # but not behind too much work already passed to it, and an idle holder comes first
    assert pass_to("v", set(), "n1", [peer("b", idle=False, resident={"v"}, backlog=1)], set(), 0, 1,
                   may_wait=True, max_backlog=1) is None
    assert pass_to("v", set(), "n1", [peer("b", idle=False, resident={"v"}, backlog=1)], set(), 0, 1,
                   may_wait=True, max_backlog=2) is not None
    idle = peer("c", resident={"v"})
    assert pass_to("v", set(), "n1", [busy, idle], set(), 0, 1, may_wait=True) == idle


def test_a_job_is_passed_on_at_most_max_declines_times():
    peers = [peer("b", resident={"v"})]
    assert pass_to("v", set(), "n1", peers, set(), 1, 1) is None
    assert pass_to("v", set(), "n1", peers, set(), 1, 2) is not None
    assert pass_to("v", set(), "n1", peers, set(), 0, 0) is None      # 0 turns affinity off


def test_node_ram_is_the_second_choice():
    peers = [peer("b", node="n2"), peer("c", node="n3")]
    got = pass_to("v", set(), "n1", peers, {"n3"}, 0, 1)
    assert got is not None and got.worker == "c"
    assert pass_to("v", set(), "n1", peers, {"n1", "n3"}, 0, 1) is None   # already in RAM here
    # VRAM beats node RAM
    got = pass_to("v", set(), "n1", [*peers, peer("d", node="n4", resident={"v"})], {"n3"}, 0, 1)
    assert got is not None and got.worker == "d"
