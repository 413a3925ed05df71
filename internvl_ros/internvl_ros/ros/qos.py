"""Image subscription QoS: match the publishers' reliability, the way rosbag2's adaptive QoS does.

- every publisher reliable -> reliable (a best-effort subscriber to a reliable publisher of large
  frames receives nothing on Fast DDS defaults; see docs/NODE.md, "Large images and QoS");
- any publisher best effort -> best effort (a reliable subscriber would not match it);
- no publisher yet -> best effort, which matches any publisher, and we look again when one appears.
"""

from __future__ import annotations

from rclpy.qos import (
    DurabilityPolicy,
    HistoryPolicy,
    QoSProfile,
    ReliabilityPolicy,
)

DOC_HINT = "docs/NODE.md, section 'Large images and QoS'"


def reliability_name(policy) -> str:
    """'reliable', 'best_effort', ... for a ReliabilityPolicy (or its int value)."""
    try:
        return ReliabilityPolicy(policy).name.lower()
    except ValueError:
        return str(policy)


def choose_reliability(publisher_reliabilities) -> tuple[ReliabilityPolicy, str]:
    """The reliability that matches every publisher, and a short reason for the log."""
    rels = [ReliabilityPolicy(r) for r in publisher_reliabilities]
    if not rels:
        return ReliabilityPolicy.BEST_EFFORT, "no publishers yet: best effort matches any"
    if all(r == ReliabilityPolicy.RELIABLE for r in rels):
        return ReliabilityPolicy.RELIABLE, f"all {len(rels)} publisher(s) are reliable"
    n_be = sum(r == ReliabilityPolicy.BEST_EFFORT for r in rels)
    return ReliabilityPolicy.BEST_EFFORT, f"{n_be} of {len(rels)} publisher(s) are best effort"


def image_qos(reliability: ReliabilityPolicy, depth: int) -> QoSProfile:
    """Keep-last ``depth``, volatile, with the given reliability."""
    return QoSProfile(
        history=HistoryPolicy.KEEP_LAST,
        depth=depth,
        reliability=reliability,
        durability=DurabilityPolicy.VOLATILE,
    )


def describe_publishers(infos) -> str:
    """'/camera_driver (best_effort, volatile), ...' for TopicEndpointInfo items.

    (Discovery does not carry the history depth, so it is not shown.)
    """
    parts = []
    for info in infos:
        q = info.qos_profile
        name = f"{info.node_namespace.rstrip('/')}/{info.node_name}"
        durability = getattr(q.durability, "name", str(q.durability)).lower()
        parts.append(f"{name} ({reliability_name(q.reliability)}, {durability})")
    return ", ".join(parts) or "none"


def mixed_reliability_warning(infos) -> str | None:
    """A warning when the topic has both reliable and best-effort publishers, else None.

    auto then subscribes best effort (a reliable subscription would not match the best-effort
    publishers), so the reliable publishers' frames arrive best effort too: on Fast DDS
    defaults, large ones are lost, although every publisher matches and no starvation warning
    would fire while the small ones get through.
    """
    rels = {int(i.qos_profile.reliability) for i in infos}
    if not {int(ReliabilityPolicy.RELIABLE), int(ReliabilityPolicy.BEST_EFFORT)} <= rels:
        return None
    reliable = [i for i in infos if int(i.qos_profile.reliability) == ReliabilityPolicy.RELIABLE]
    return (
        f"reliable and best-effort publishers: {describe_publishers(infos)}. The subscription "
        f"is best effort (the only one that matches both), so the frames of the reliable "
        f"one(s) ({describe_publishers(reliable)}) arrive best effort too, and large ones are "
        f"lost on Fast DDS defaults. Publish from one kind, or use "
        f"config/fastdds_large_data.xml on both sides: see {DOC_HINT}."
    )
