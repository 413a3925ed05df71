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
