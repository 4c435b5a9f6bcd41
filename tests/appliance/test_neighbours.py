"""A worker's side of membership without sockets: lists from Configure, answering pings."""

from __future__ import annotations

from appliance.data.neighbours import Neighbours
from appliance.wire import messages as msg


def _info(name: str, rank: int) -> msg.MemberInfo:
    return msg.MemberInfo(name=name, data_addr=f"ipc:///tmp/{name}.data",
                          control_addr=f"ipc:///tmp/{name}.ctl", rank=rank)


def _configure(**fields: object) -> msg.Configure:
    return msg.Configure(node="w2", start=1, end=3, successor_addr="ipc:///tmp/w3.data",
                         result_addr="ipc:///tmp/source.data", **fields)  # type: ignore[arg-type]


def test_configure_gives_the_lists_and_the_nearest_successor_is_next() -> None:
    n = Neighbours("w2", None, None, 200.0)
    n.configure(_configure(me=_info("w2", 20), predecessor_member=_info("w1", 10),
                           successors=(_info("w3", 30), _info("w4", 40)),
                           anchor_control_addr="ipc:///tmp/source.ctl"))
    assert n.member and n.successor_names() == ("w3", "w4")
    assert n.anchor == "ipc:///tmp/source.ctl"
    hop = n.next_hop()
    assert hop is not None and hop.name == "w3"
    skipped = n.next_hop(frozenset({"w3"}))
    assert skipped is not None and skipped.name == "w4"
    assert n.next_hop(frozenset({"w3", "w4"})) is None


def test_an_old_source_configure_means_no_membership() -> None:
    n = Neighbours("w2", None, None, 200.0)
    n.configure(_configure())  # no membership fields: the data path uses successor_addr
    assert not n.member and n.next_hop() is None and n.successor_names() == ()


def test_a_ping_answers_with_the_lists_and_takes_a_nearer_predecessor() -> None:
    n = Neighbours("w2", None, None, 200.0)
    n.configure(_configure(me=_info("w2", 20), predecessor_member=_info("w0", 5),
                           successors=(_info("w3", 30),)))
    reply = n.answer(msg.Stabilise(caller=_info("w1", 10)))  # joined between w0 and w2
    assert reply.node == "w2" and reply.predecessor == _info("w1", 10)
    assert reply.successors == (_info("w3", 30),)
    again = n.answer(msg.Stabilise(caller=_info("w0", 5)))  # further away: not taken
    assert again.predecessor == _info("w1", 10)


def test_a_round_that_straddles_a_configure_leaves_the_new_lists_alone() -> None:
    """The round pings a dead w3 (a second or more of time-outs); meanwhile the source routes
    around it and configures [w4, w5]: the round's stale view must not put w3 back."""
    n = Neighbours("w2", None, None, 200.0)
    n.configure(_configure(me=_info("w2", 20), predecessor_member=_info("w1", 10),
                           successors=(_info("w3", 30), _info("w4", 40))))
    calls: list[str] = []

    def ask(addr: str, m: msg.ControlMessage, timeout_ms: int) -> msg.ControlMessage | None:
        calls.append(addr)
        if len(calls) == 1:  # the source re-routes while we wait on w3
            n.configure(_configure(me=_info("w2", 20), predecessor_member=_info("w1", 10),
                                   successors=(_info("w4", 40), _info("w5", 50))))
        if "w3" in addr:
            return None  # dead
        name = addr.rsplit("/", 1)[-1].split(".")[0]
        return msg.StabiliseReply(node=name, successors=(_info("w5", 50),))

    n._ask = ask  # type: ignore[method-assign]
    n.stabilise_once()
    assert n.successor_names() == ("w4", "w5")
    hop = n.next_hop()
    assert hop is not None and hop.name == "w4"
    n.stabilise_once()  # the next round starts from the new lists
    assert n.successor_names()[0] == "w4"
