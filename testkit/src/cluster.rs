//! A three-node RabbitMQ cluster of a test's own, on this machine: nodes with their own names,
//! ports and data directories (see [`RabbitNode`]), joined with `join_cluster`. Torn down with
//! its nodes when dropped.

use crate::node::RabbitNode;

pub struct RabbitCluster {
    pub nodes: Vec<RabbitNode>,
}

impl RabbitCluster {
    /// Starts `size` nodes and joins the others to the first.
    ///
    /// # Panics
    /// When a node does not start or join.
    pub fn start(tag: &str, size: usize) -> Self {
        let nodes: Vec<RabbitNode> =
            (0..size).map(|i| RabbitNode::start(&format!("{tag}{i}"))).collect();
        for node in &nodes[1..] {
            node.ctl(&["stop_app"]);
            node.ctl(&["join_cluster", nodes[0].name()]);
            node.ctl(&["start_app"]);
            node.wait_for_port();
        }
        Self { nodes }
    }

    /// Every node's URI, comma-separated, as `RABBITMQ_URI` takes them.
    pub fn uris(&self) -> String {
        self.nodes.iter().map(RabbitNode::uri).collect::<Vec<_>>().join(",")
    }

    /// The node leading quorum queue `queue` (default vhost), as `list_queues` reports it.
    ///
    /// # Panics
    /// When no running node reports it.
    pub fn leader_of(&self, queue: &str) -> usize {
        leader(&self.nodes, queue)
            .unwrap_or_else(|| panic!("no node reports the leader of {queue}"))
    }

    /// Kills every node at once, then starts them all again (they wait for each other).
    pub fn restart_all(&self) {
        for node in &self.nodes {
            node.kill();
        }
        for node in &self.nodes {
            node.launch();
        }
        for node in &self.nodes {
            node.wait_for_port();
        }
    }
}

/// Which of `nodes` leads quorum queue `queue` (default vhost), as the first node that answers
/// `list_queues` reports it.
pub fn leader(nodes: &[RabbitNode], queue: &str) -> Option<usize> {
    nodes.iter().find_map(|node| {
        let listing = node.ctl_output(&["list_queues", "name", "leader"])?;
        let leader = listing.lines().find_map(|line| {
            let (name, leader) = line.split_once('\t')?;
            (name == queue).then(|| leader.trim().to_owned())
        })?;
        nodes.iter().position(|n| n.name() == leader)
    })
}
