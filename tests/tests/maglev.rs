//! Maglev consistent hashing through BPF_PROG_TEST_RUN: two nodes, each the
//! agent's programs and writer on a pin directory of its own, pick the same
//! backend for the same flow to their NodePort; with random picks they do
//! not; removing one of ten backends moves the flows it had and few others.
//! No interface is attached: SYNs from outside run through the tc program
//! of the external interface, and the backend is read off the rewritten
//! packet.
use std::net::Ipv4Addr;

use integration_tests::{
    bpf::{self, Loaded, Prog, TC_ACT_OK},
    packet::{self, Builder, SYN},
};
use service_agent::{
    dataplane::{Dataplane, IfaceRole},
    plan::{
        FrontendKey, FrontendKind, Plan, Protocol,
        maglev::{Balancing, DEFAULT_TABLE_SIZE},
    },
};

const EXTERNAL: Prog = Prog::Tc(IfaceRole::External);
const NODE_PORT: u16 = 30080;
const FLOWS: u16 = 1000;
const MAGLEV: Balancing = Balancing::Maglev {
    table_size: DEFAULT_TABLE_SIZE,
};

fn backend_addr(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 0, 10 + i)
}

/// The NodePort of Service default/web with backends `indexes`.
fn plan(indexes: &[u8]) -> Plan {
    let backends = indexes
        .iter()
        .map(|i| bpf::backend(backend_addr(*i), 8080, true))
        .collect();
    let fk = FrontendKey {
        addr: Ipv4Addr::UNSPECIFIED.into(),
        port: NODE_PORT,
        proto: Protocol::Tcp,
    };
    let fe = bpf::frontend("default/web", FrontendKind::NodePort, backends);
    Plan {
        frontends: [(fk, fe)].into_iter().collect(),
        ..Default::default()
    }
}

struct Node {
    l: Loaded,
    addr: Ipv4Addr,
}

impl Node {
    fn new(addr: Ipv4Addr, b: Balancing, p: &Plan) -> Node {
        let mut l = Loaded::new("mglv", &bpf::sizes(1024, 1 << 15)).unwrap();
        l.set_node_addr(addr).unwrap();
        let mut n = Node { l, addr };
        n.program(b, p);
        n
    }

    fn program(&mut self, b: Balancing, p: &Plan) {
        self.l.dp.writer.set_balancing(b);
        self.l.apply(p).unwrap();
    }

    /// The backend the node gives each flow of `set` (a new flow each: no
    /// two sets share a source port).
    fn picks(&mut self, set: u16) -> Vec<Ipv4Addr> {
        (0..FLOWS)
            .map(|i| {
                let client = format!("192.168.{}.{}", 100 + i % 7, 1 + i % 251);
                let sport = 10_000 * (set + 1) + i;
                let syn =
                    Builder::tcp(&client, sport, &self.addr.to_string(), NODE_PORT, SYN).build();
                let out = self.l.run(EXTERNAL, &syn);
                assert_eq!(out.verdict, TC_ACT_OK, "flow {client}:{sport}");
                let seen = packet::parse(&out.packet);
                assert!(seen.ip_csum_ok && seen.l4_csum_ok == Some(true));
                assert_eq!(seen.dport, 8080, "flow {client}:{sport}");
                seen.dst
            })
            .collect()
    }
}

fn agreeing(a: &[Ipv4Addr], b: &[Ipv4Addr]) -> usize {
    a.iter().zip(b).filter(|(x, y)| x == y).count()
}

#[test]
fn two_nodes_pick_the_same_backend_and_removing_one_of_ten_moves_few_other_flows() {
    let all: Vec<u8> = (0..10).collect();
    let mut one = Node::new(Ipv4Addr::new(192, 168, 77, 11), MAGLEV, &plan(&all));
    let mut two = Node::new(Ipv4Addr::new(192, 168, 77, 12), MAGLEV, &plan(&all));

    let (a1, a2) = (one.picks(0), two.picks(0));
    assert_eq!(agreeing(&a1, &a2), FLOWS as usize, "both nodes on Maglev");
    // Spread over every backend, about evenly: not one backend for all.
    for i in &all {
        let n = a1.iter().filter(|a| **a == backend_addr(*i)).count();
        assert!((50..=150).contains(&n), "backend {i}: {n} of {FLOWS} flows");
    }

    // A restarted agent reads the table back as the one it would build:
    // the same plan writes nothing.
    let mut again =
        Dataplane::load(one.l.pin_dir().to_path_buf(), &bpf::sizes(1024, 1 << 15)).unwrap();
    again.writer.set_balancing(MAGLEV);
    let r = again.writer.apply(&mut again.tables, &plan(&all));
    assert!(r.errors.is_empty() && r.frontends_written == 0, "{r:?}");
    drop(again);

    // The contrast: random picks on the second node agree about a tenth of
    // the time.
    two.program(Balancing::Random, &plan(&all));
    let (b1, b2) = (one.picks(1), two.picks(1));
    let random = agreeing(&b1, &b2);
    assert!(
        random < FLOWS as usize / 4,
        "{random} of {FLOWS} agree at random"
    );

    // The second node loses backend 3; the first still has all ten.
    let gone = backend_addr(3);
    let rest: Vec<u8> = all.iter().copied().filter(|i| *i != 3).collect();
    two.program(MAGLEV, &plan(&rest));
    let (c1, c2) = (one.picks(2), two.picks(2));
    let mut others = 0;
    let mut moved = 0;
    for (before, after) in c1.iter().zip(&c2) {
        assert_ne!(*after, gone);
        if *before != gone {
            others += 1;
            moved += usize::from(before != after);
        }
    }
    assert!(
        others < FLOWS as usize,
        "no flow was on the removed backend"
    );
    assert!(
        moved * 100 <= others * 3,
        "{moved} of the {others} flows not on the removed backend moved"
    );
}
