//! Networks and addresses through the API, on libvirt's test driver:
//! concurrent creates fill a /28 exactly and never share an address, the
//! next is refused naming the full network, the agent attaches the address
//! with its MAC and the traffic filter, a deleted VPS's address is free
//! again, and institutions see only the networks granted to them.

use std::{collections::BTreeSet, time::Duration};

use betang_proto::v1::{
    CreateNetworkRequest, CreateVpsRequest, DeleteVpsRequest, GetNetworkRequest, GetVpsRequest,
    GrantNetworkRequest, ListNetworksRequest, MoveVpsRequest, Network, StopVpsRequest, VpsState,
};
use betang_tests::{Cluster, ClusterOptions, wait_state};
use tonic::Code;

const T: Duration = Duration::from_secs(120);

fn network(name: &str) -> Network {
    Network {
        name: name.into(),
        attach_kind: "bridge".into(),
        attach_source: "br-betang-t".into(),
        cidr: "198.18.0.0/28".into(),
        gateway: "198.18.0.1".into(),
        dns: vec!["198.18.0.1".into()],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_creates_fill_a_network_exactly_and_never_share_an_address() -> anyhow::Result<()>
{
    let cluster = Cluster::start(ClusterOptions::default()).await?;
    let op = cluster.as_operator().await?;
    let name = format!("{}-net", cluster.prefix.to_lowercase())
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .take(32)
        .collect::<String>();

    // Bad input names the field, and creates nothing.
    for (field, bad) in [
        (
            "name",
            Network {
                name: "a\"b<&/..".into(),
                ..network(&name)
            },
        ),
        (
            "cidr",
            Network {
                cidr: "198.18.0.1/28".into(),
                ..network(&name)
            },
        ),
        (
            "cidr",
            Network {
                cidr: "198.18.0.0/31".into(),
                ..network(&name)
            },
        ),
        (
            "gateway",
            Network {
                gateway: "198.19.0.1".into(),
                ..network(&name)
            },
        ),
        (
            "reserved",
            Network {
                reserved: "198.18.0.9-198.18.1.2".into(),
                ..network(&name)
            },
        ),
        (
            "attach_source",
            Network {
                attach_source: "br0\"/><x".into(),
                ..network(&name)
            },
        ),
    ] {
        let e = op
            .networks
            .clone()
            .create_network(CreateNetworkRequest { network: Some(bad) })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{field}: {e}");
        assert!(e.message().starts_with(field), "{field}: {}", e.message());
    }
    let listed = op
        .networks
        .clone()
        .list_networks(ListNetworksRequest {})
        .await?
        .into_inner();
    assert!(listed.networks.is_empty(), "nothing created");

    let created = op
        .networks
        .clone()
        .create_network(CreateNetworkRequest {
            network: Some(network(&name)),
        })
        .await?
        .into_inner();
    // 16 addresses less the network's, the broadcast and the gateway.
    assert_eq!(created.addresses_total, 13);
    op.networks
        .clone()
        .grant_network(GrantNetworkRequest {
            name: name.clone(),
            institution_id: cluster.people.inst_a.clone(),
            is_default: true,
        })
        .await?;

    // Another institution does not see it, nor can use it.
    let b = cluster.clients(&cluster.people.member_b).await?;
    let e = b
        .networks
        .clone()
        .get_network(GetNetworkRequest { name: name.clone() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let mut asked = cluster.spec("b-asks");
    asked.network = name.clone();
    let e = b
        .vps
        .clone()
        .create_vps(CreateVpsRequest {
            institution_id: String::new(),
            ..cluster.create(asked)
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("not granted"), "{}", e.message());

    // Twenty at once on thirteen addresses.
    let creates = (0..20).map(|i| {
        let (op, req) = (op.clone(), cluster.create(cluster.spec(&format!("n{i}"))));
        async move { op.vps.clone().create_vps(req).await }
    });
    let answers = futures::future::join_all(creates).await;
    let mut addresses = BTreeSet::new();
    let mut placed = Vec::new();
    for a in &answers {
        match a {
            Ok(v) => {
                let v = v.get_ref();
                let at = v.attachment.clone().expect("an address");
                assert_eq!(at.network, name);
                assert_eq!(at.prefix_len, 28);
                assert!(
                    addresses.insert(at.ip_address.clone()),
                    "{} twice",
                    at.ip_address
                );
                placed.push(v.clone());
            }
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
                assert!(
                    e.message()
                        .contains(&format!("network {name} (198.18.0.0/28) is full")),
                    "{}",
                    e.message()
                );
            }
        }
    }
    assert_eq!(placed.len(), 13, "{answers:?}");
    let expected: BTreeSet<String> = (2..=14).map(|i| format!("198.18.0.{i}")).collect();
    assert_eq!(addresses, expected);
    let macs: BTreeSet<String> = placed
        .iter()
        .map(|v| v.attachment.clone().unwrap().mac_address)
        .collect();
    assert_eq!(macs.len(), 13, "every MAC its own");

    // The agent attaches it with its MAC and the filter bound to it.
    let first = placed[0].clone();
    wait_state(&op.vps, &first.id, VpsState::Running, T).await?;
    let at = first.attachment.clone().unwrap();
    let host = cluster
        .hosts
        .iter()
        .find(|h| h.host_id == first.host_id)
        .expect("its host");
    let lv = host.libvirt.clone().expect("libvirt's test driver");
    let xml = lv
        .conn()?
        .lookup_domain_by_name(&betang_agent::names::domain_name(&first.id))?
        .xml_desc(0)?;
    assert!(
        xml.contains(&format!("<mac address='{}'/>", at.mac_address)),
        "{xml}"
    );
    assert!(xml.contains("<source bridge='br-betang-t'/>"), "{xml}");
    assert!(xml.contains("<filterref filter='clean-traffic'>"), "{xml}");
    assert!(
        xml.contains(&format!("<parameter name='IP' value='{}'/>", at.ip_address)),
        "{xml}"
    );

    // Deleted, its address is free again, and only then.
    op.vps
        .clone()
        .delete_vps(DeleteVpsRequest {
            id: first.id.clone(),
        })
        .await?;
    wait_state(&op.vps, &first.id, VpsState::Deleted, T).await?;
    let again = op
        .vps
        .clone()
        .create_vps(cluster.create(cluster.spec("again")))
        .await?
        .into_inner();
    assert_eq!(again.attachment.unwrap().ip_address, at.ip_address);

    // An operator may name a free address, never a held one.
    let mut specific = cluster.create(cluster.spec("specific"));
    specific.ip_address = "198.18.0.3".into();
    let e = op.vps.clone().create_vps(specific).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("ip_address"), "{}", e.message());
    let n = op
        .networks
        .clone()
        .get_network(GetNetworkRequest { name: name.clone() })
        .await?
        .into_inner();
    assert_eq!((n.addresses_used, n.addresses_total), (13, 13));
    // And on the controller's /metrics.
    let metrics = cluster
        .controller
        .as_ref()
        .and_then(|c| c.metrics_addr)
        .expect("metrics_listen is set");
    let body = betang_tests::http_get(metrics, "/metrics").await?;
    for (family, want) in [
        ("betang_network_addresses", 13.0),
        ("betang_network_addresses_used", 13.0),
    ] {
        assert_eq!(
            betang_tests::sample(&body, family, &[("network", &name)]),
            Some(want),
            "{family}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_vps_with_an_address_moves_only_where_its_network_is() -> anyhow::Result<()> {
    // Hosts 0 and 2 are in zone "a", 1 and 3 in zone "b".
    let cap = ClusterOptions::default().hosts[0];
    let cluster = Cluster::start(ClusterOptions {
        hosts: vec![cap; 4],
        ..Default::default()
    })
    .await?;
    let op = cluster.as_operator().await?;
    let name = format!("z{:08x}", fastrand::u32(..));
    op.networks
        .clone()
        .create_network(CreateNetworkRequest {
            network: Some(Network {
                zone: "a".into(),
                ..network(&name)
            }),
        })
        .await?;
    op.networks
        .clone()
        .grant_network(GrantNetworkRequest {
            name: name.clone(),
            institution_id: cluster.people.inst_a.clone(),
            is_default: true,
        })
        .await?;
    let zone_a: BTreeSet<String> = [0, 2]
        .into_iter()
        .map(|i| cluster.hosts[i].host_id.clone())
        .collect();
    let mut spec = cluster.spec("zoned");
    spec.network = name.clone();
    let v = op
        .vps
        .clone()
        .create_vps(cluster.create(spec))
        .await?
        .into_inner();
    wait_state(&op.vps, &v.id, VpsState::Running, T).await?;
    op.vps
        .clone()
        .stop_vps(StopVpsRequest {
            id: v.id.clone(),
            ..Default::default()
        })
        .await?;
    wait_state(&op.vps, &v.id, VpsState::Stopped, T).await?;
    // Each move goes to the other host of zone "a", never to zone "b",
    // though the two hosts of "b" are as free.
    let mut on = op
        .vps
        .clone()
        .get_vps(GetVpsRequest {
            id: v.id.clone(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .host_id;
    assert!(zone_a.contains(&on), "placed in zone a: {on}");
    for _ in 0..3 {
        let moving = op
            .vps
            .clone()
            .move_vps(MoveVpsRequest {
                id: v.id.clone(),
                restart: false,
            })
            .await?
            .into_inner();
        assert!(
            zone_a.contains(&moving.move_target) && moving.move_target != on,
            "a move to {:?} from {on}",
            moving.move_target
        );
        wait_state(&op.vps, &v.id, VpsState::Stopped, T).await?;
        on = moving.move_target;
    }
    Ok(())
}
