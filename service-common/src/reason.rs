//! Why the programs did what they did to a packet: one table (as Cilium's
//! `drop_reasons.h`), from which the enum, its list, its names and its
//! verdicts are generated, so a new reason is one line here. Each reason has
//! a per-CPU counter in REASONS, indexed by its position in the table.

/// What happened to a packet counted under a reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// Sent on untouched (to the stack, or from XDP to tc).
    Passed,
    /// Rewritten and sent on (through the stack, or straight out of an
    /// interface by XDP or a redirect to the next hop).
    Translated,
    /// Turned into an answer to its sender (TCP RST, ICMP port unreachable).
    Answered,
    Dropped,
}

impl Verdict {
    pub const fn name(self) -> &'static str {
        match self {
            Verdict::Passed => "passed",
            Verdict::Translated => "translated",
            Verdict::Answered => "answered",
            Verdict::Dropped => "dropped",
        }
    }
}

macro_rules! reasons {
    ($($(#[$doc:meta])* $variant:ident $name:literal $verdict:ident,)*) => {
        /// Counted once where a program decides a packet's verdict; the flow
        /// events (`NewFlow`, `SnatFlow`, `AffinityHit`, `AffinityStale`,
        /// `StaleFlowMoved`, and in XDP the conntrack match) are counted as
        /// well, where the flow's state changes, so one packet may count
        /// under an event and under its verdict.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Reason {
            $($(#[$doc])* $variant,)*
        }

        impl Reason {
            pub const ALL: [Reason; Self::COUNT] = [$(Reason::$variant,)*];
            pub const COUNT: usize = [$(Reason::$variant,)*].len();

            pub const fn name(self) -> &'static str {
                match self {
                    $(Reason::$variant => $name,)*
                }
            }

            pub const fn verdict(self) -> Verdict {
                match self {
                    $(Reason::$variant => Verdict::$verdict,)*
                }
            }
        }
    };
}

reasons! {
    /// A frontend without backends answered with TCP RST / ICMP port unreachable.
    RejectedNoBackend "rejected_no_backend" Answered,
    /// The reject could not be built (a RST is never answered; UDP with IP options).
    RejectFailed "reject_failed" Dropped,
    /// A later IPv4 or IPv6 fragment of a datagram whose first fragment was not seen
    /// (or not translated): never guessed at.
    FragmentPassed "fragment_passed" Passed,
    /// IPv4 header shorter than 20 bytes or longer than the packet.
    MalformedIp "malformed_ip" Passed,
    /// L4 header cut short.
    TruncatedL4 "truncated_l4" Passed,
    /// A slot pointed at no backend (agent mid-update or corrupt map).
    NoBackendEntry "no_backend_entry" Dropped,
    /// Conntrack insert failed: the flow could not be pinned.
    CtInsertFailed "ct_insert_failed" Dropped,
    /// A checksum or store helper failed mid-rewrite.
    RewriteFailed "rewrite_failed" Dropped,
    /// A reply that matched a conntrack entry and was reverse-translated.
    ReplyTranslated "reply_translated" Translated,
    /// A request that matched an existing conntrack entry.
    CtHit "ct_hit" Translated,
    /// A new flow was assigned a backend (event).
    NewFlow "new_flow" Translated,
    /// An affinity entry decided the backend (event).
    AffinityHit "affinity_hit" Translated,
    /// An affinity entry was found but expired or stale, and ignored (event).
    AffinityStale "affinity_stale" Translated,
    /// A UDP flow whose backend is gone was moved to a live backend (event).
    StaleFlowMoved "stale_flow_moved" Translated,
    /// externalTrafficPolicy Local and no endpoint on this node, as kube-proxy
    /// does, so load balancers' health checks steer traffic away.
    NoLocalEndpoint "no_local_endpoint" Dropped,
    /// A new flow was source-NATed to the node address (remote backend; event).
    SnatFlow "snat_flow" Translated,
    /// No SNAT address configured (a full port range is
    /// `snat_ports_exhausted`).
    SnatFailed "snat_failed" Dropped,
    /// An ICMP error quoting a translated flow was translated too.
    IcmpErrorTranslated "icmp_error_translated" Translated,
    /// A TCP segment without SYN for a frontend, with no conntrack entry
    /// (conntrack's INVALID): not sent to a random backend.
    CtInvalid "ct_invalid" Dropped,
    /// A new flow from outside the frontend's loadBalancerSourceRanges.
    SourceRangeDenied "source_range_denied" Dropped,
    /// A later fragment followed its first fragment's translation.
    FragmentTranslated "fragment_translated" Translated,
    /// XDP translated a packet and sent it back out the interface it came in
    /// on (through the XDP_EGRESS devmap, not XDP_TX).
    XdpTx "xdp_tx" Translated,
    /// XDP translated a packet and sent it out of another external interface.
    XdpRedirect "xdp_redirect" Translated,
    /// XDP could not forward a flow it would translate (no route, unresolved
    /// neighbour, egress not an XDP target): tc translates it.
    XdpPassedToTc "xdp_passed_to_tc" Passed,
    /// A reply the node's own stack sent for a translated flow (a
    /// host-network endpoint answering) was reverse-translated at tc egress.
    LocalReplyTranslated "local_reply_translated" Translated,
    /// A packet of a flow the kernel's conntrack translates (opened through
    /// kube-proxy's rules before the agent started): left to netfilter.
    KernelFlowPassed "kernel_flow_passed" Passed,
    /// A host socket's connect() or sendto() to a frontend was given a
    /// backend (socket hooks: the verdict is on the call, not a packet).
    SockTranslated "sock_translated" Translated,
    /// A host socket's connect() or sendto() to a frontend without any
    /// endpoint failed at once with ECONNREFUSED.
    SockRefused "sock_refused" Answered,
    /// As SockRefused, for a frontend whose traffic policy is Local and that
    /// has no endpoint on this node (tc drops such packets; a socket cannot
    /// be dropped without hanging its caller).
    SockNoLocalEndpoint "sock_no_local_endpoint" Answered,
    /// A datagram's source (recvmsg) or a socket's peer (getpeername) was
    /// turned back from the backend into the Service address.
    SockReplyTranslated "sock_reply_translated" Translated,
    /// A host socket was translated but its reverse entry could not be
    /// stored: its replies and getpeername show the backend address.
    SockRevNatFailed "sock_revnat_failed" Translated,
    /// A new flow's reply tuple was another flow's (one client port reaching
    /// two frontends that share a backend): its client port, as the backend
    /// sees it, was rewritten to a free one (event).
    TupleClashPortRewritten "tuple_clash_port_rewritten" Translated,
    /// As above, but no free port was found: the opening was dropped, never
    /// given the other flow's replies.
    TupleClash "tuple_clash" Dropped,
    /// A new source-NATed flow found no free port in the SNAT port range
    /// (its own, then up to 4,096 others): dropped, never given a port
    /// another flow holds.
    SnatPortsExhausted "snat_ports_exhausted" Dropped,
    /// The flood guard: this CPU had opened its --flood-threshold new flows
    /// this second, so this one was dropped rather than recorded (its
    /// entries would push established flows out of the LRU conntrack).
    FloodDropped "flood_dropped" Dropped,
    /// A pod socket's connect() or sendto() to a frontend that the socket
    /// hooks (--socket-lb pods) left to the tc program on the pod's veth:
    /// connected UDP (only tc moves a flow whose backend left) and frontends
    /// with source ranges (only a packet carries the pod's address).
    SockPassedToTc "sock_passed_to_tc" Passed,
    /// IPv6 header cut short, not version 6, a payload length beyond the
    /// packet, or an extension header cut short or running past it.
    MalformedIpv6 "malformed_ipv6" Passed,
    /// More IPv6 extension headers before the upper layer than the parser
    /// walks (6): passed untouched rather than guessed at.
    Ipv6ExtChainTooLong "ipv6_ext_chain_too_long" Passed,
    /// A UDP datagram over IPv6 with checksum 0, which IPv6 forbids (RFC
    /// 8200 8.1): passed untouched for the receiver to discard.
    Ipv6UdpZeroChecksum "ipv6_udp_zero_checksum" Passed,
    /// A packet that may open a flow (a SYN, or UDP), to no frontend and
    /// known to no entry, on the tuple a translated flow's backend sees (a
    /// client port reused to reach that backend directly): the translated
    /// flow cannot be alive beside it, so its entries were removed before
    /// they could turn this flow's replies into its own; passed untouched.
    ReusedTupleRetired "reused_tuple_retired" Passed,
    /// A translated socket was closed and its reverse entry removed from
    /// SOCK_REVNAT (event: the verdict is on its connect()).
    SockRevNatReleased "sock_revnat_released" Translated,
    /// A TCP SYN found its flow's request entry without the reply entry
    /// (half of an idle flow removed while the client reused its port): the
    /// half was removed and the SYN opened the flow afresh (event).
    HalfFlowReopened "half_flow_reopened" Translated,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::REASONS_MAX;

    #[test]
    fn reasons_are_indexed_by_discriminant_and_fit_the_map() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
        assert!(Reason::COUNT as u32 <= REASONS_MAX);
    }

    #[test]
    fn names_are_unique_snake_case() {
        for (i, a) in Reason::ALL.iter().enumerate() {
            assert!(
                a.name()
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
                "{a:?}"
            );
            for b in &Reason::ALL[i + 1..] {
                assert_ne!(a.name(), b.name());
            }
        }
    }

    #[test]
    fn verdicts_say_what_happens() {
        assert_eq!(Reason::RejectedNoBackend.verdict(), Verdict::Answered);
        assert_eq!(Reason::XdpTx.verdict(), Verdict::Translated);
        assert_eq!(Reason::XdpRedirect.verdict(), Verdict::Translated);
        assert_eq!(Reason::XdpPassedToTc.verdict(), Verdict::Passed);
        assert_eq!(Reason::CtInvalid.verdict(), Verdict::Dropped);
        assert_eq!(Reason::MalformedIp.verdict(), Verdict::Passed);
    }
}
