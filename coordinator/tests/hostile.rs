//! Hostile clients against an in-process coordinator on 127.0.0.1, speaking the control
//! protocol by hand where the client library would refuse to misbehave: a join under another
//! node's peer id, a forged or missing identity proof, a resume of another node's member id,
//! and more connections or joins from one address than the limits allow. Each is refused with
//! its reason and the honest member stays.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail};
use forge_coordinator::client::tls::{self, ClusterToken};
use forge_coordinator::client::wire::{read_frame, write_frame};
use forge_coordinator::identity::named_keypair;
use forge_coordinator::{ClientOptions, CoordinatorClient, Server, fetch_status};
use forge_protocol::session::{
    IDENTITY_CHALLENGE_LEN, IDENTITY_EXPORTER_LABEL, IdentityProof, Open, OpenReply, Purpose,
};
use forge_protocol::{
    CoordinatorMessage, ErrorCode, Hello, Join, JoinAccepted, MemberId, NodeMessage,
};
use libp2p_identity::Keypair;
use tokio::sync::oneshot;

const TINY_RUN: &str = include_str!("../../configs/tiny-cpu.toml");

/// A coordinator serving until dropped.
struct Coordinator {
    addr: SocketAddr,
    token: ClusterToken,
    _stop: oneshot::Sender<()>,
    _dir: tempfile::TempDir,
}

async fn coordinator(extra: &str) -> anyhow::Result<Coordinator> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("run.toml");
    let text = format!("{TINY_RUN}\n[coordinator]\nmin_replicas = 2\n{extra}");
    let config = forge_coordinator::run_config::parse(text, &path)?;
    let server = Server::bind(config, "127.0.0.1:0".parse()?, dir.path())?;
    let addr = server.local_addr()?;
    let token = server.token();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(server.run(async move {
        let _ = stopped.await;
    }));
    Ok(Coordinator {
        addr,
        token,
        _stop: stop,
        _dir: dir,
    })
}

use forge_coordinator::identity::simulated_capabilities as capabilities;

fn peer_id(key: &Keypair) -> String {
    key.public().to_peer_id().to_string()
}

/// An honest member, through the client library.
async fn honest(
    c: &Coordinator,
    key: Keypair,
) -> anyhow::Result<(CoordinatorClient, JoinAccepted)> {
    let caps = capabilities(peer_id(&key));
    let (client, accepted, _notes) = CoordinatorClient::connect(
        c.addr,
        &c.token.to_string(),
        key,
        caps,
        ClientOptions::default(),
    )
    .await?;
    Ok((client, accepted))
}

/// A connection opened by hand.
struct Raw {
    endpoint: quinn::Endpoint,
    connection: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
}

impl Raw {
    async fn connect(c: &Coordinator) -> anyhow::Result<Raw> {
        let endpoint = quinn::Endpoint::client((std::net::Ipv4Addr::LOCALHOST, 0).into())?;
        let config = tls::client_config(&c.token, Duration::from_secs(5))?;
        let connection = endpoint
            .connect_with(config, c.addr, tls::SERVER_NAME)?
            .await?;
        let (send, recv) = connection.open_bi().await?;
        Ok(Raw {
            endpoint,
            connection,
            send,
            recv,
        })
    }

    /// Closes the connection and waits until the coordinator has been told.
    async fn close(self) {
        self.connection.close(0u32.into(), b"done");
        self.endpoint.wait_idle().await;
    }

    /// This connection's join challenge, as an honest client derives it.
    fn challenge(&self) -> anyhow::Result<[u8; IDENTITY_CHALLENGE_LEN]> {
        let mut challenge = [0u8; IDENTITY_CHALLENGE_LEN];
        self.connection
            .export_keying_material(&mut challenge, IDENTITY_EXPORTER_LABEL, &[])
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        Ok(challenge)
    }

    /// Sends a join `Open` followed by `proof` (`None`: nothing) and returns the reply.
    async fn open(
        &mut self,
        token: &ClusterToken,
        proof: Option<IdentityProof>,
    ) -> anyhow::Result<OpenReply> {
        let open = Open {
            hello: Hello::current(),
            token_secret: token.secret().to_string(),
            purpose: Purpose::Join,
        };
        write_frame(&mut self.send, &open.to_frame()?).await?;
        if let Some(proof) = proof {
            write_frame(&mut self.send, &proof.to_frame()?).await?;
        } else {
            // What a client of the previous protocol sends next.
            let hello = NodeMessage::Hello(Hello::current());
            write_frame(&mut self.send, &hello.to_frame()?).await?;
        }
        let frame = read_frame(&mut self.recv)
            .await?
            .context("no answer to Open")?;
        Ok(OpenReply::from_frame(&frame)?)
    }

    /// Sends Hello and `join`, and returns the coordinator's answer.
    async fn join(&mut self, join: Join) -> anyhow::Result<CoordinatorMessage> {
        for message in [
            NodeMessage::Hello(Hello::current()),
            NodeMessage::Join(join),
        ] {
            write_frame(&mut self.send, &message.to_frame()?).await?;
        }
        loop {
            let frame = read_frame(&mut self.recv)
                .await?
                .context("closed without answering the join")?;
            match CoordinatorMessage::from_frame(&frame)? {
                CoordinatorMessage::Hello(_) => {}
                other => return Ok(other),
            }
        }
    }
}

fn refused(reply: OpenReply) -> anyhow::Result<(ErrorCode, String)> {
    match reply {
        OpenReply::Refused(reply) => Ok((reply.code, reply.message)),
        OpenReply::Accepted { .. } => bail!("the coordinator accepted the connection"),
    }
}

async fn member_peer_ids(c: &Coordinator) -> anyhow::Result<Vec<(MemberId, String)>> {
    let status = fetch_status(c.addr, &c.token.to_string(), Duration::from_secs(5)).await?;
    Ok(status
        .members
        .into_iter()
        .map(|m| (m.member, m.peer_id))
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nobody_joins_as_another_node_or_resumes_its_member_id() -> anyhow::Result<()> {
    let c = coordinator("").await?;
    let victim = named_keypair("victim");
    let thief = named_keypair("thief");
    let (_victim_client, victim_joined) = honest(&c, victim.clone()).await?;

    // The thief proves its own key, then joins under the victim's peer id.
    let mut raw = Raw::connect(&c).await?;
    let proof = forge_coordinator::client::prove_identity(&thief, &raw.challenge()?);
    let reply = raw.open(&c.token, Some(proof)).await?;
    assert!(matches!(reply, OpenReply::Accepted { .. }), "{reply:?}");
    let answer = raw
        .join(Join {
            capabilities: capabilities(peer_id(&victim)),
            rejoin: Some(victim_joined.member),
        })
        .await?;
    let CoordinatorMessage::Error(error) = answer else {
        bail!("the join under the victim's peer id was answered {answer:?}");
    };
    assert_eq!(error.code, ErrorCode::Unauthorized);
    assert!(
        error.message.contains(&format!(
            "proved the key of {}; a node joins with the peer id of its own key",
            peer_id(&thief)
        )),
        "{}",
        error.message
    );

    // A proof carrying the victim's public key but signed by the thief.
    let mut raw = Raw::connect(&c).await?;
    let mut forged = forge_coordinator::client::prove_identity(&thief, &raw.challenge()?);
    forged.public_key = victim.public().encode_protobuf();
    let (code, message) = refused(raw.open(&c.token, Some(forged)).await?)?;
    assert_eq!(code, ErrorCode::Unauthorized);
    assert!(message.contains("does not verify"), "{message}");

    // A proof made on another connection (replayed).
    let other = Raw::connect(&c).await?;
    let replayed = forge_coordinator::client::prove_identity(&thief, &other.challenge()?);
    let mut raw = Raw::connect(&c).await?;
    let (code, message) = refused(raw.open(&c.token, Some(replayed)).await?)?;
    assert_eq!(code, ErrorCode::Unauthorized);
    assert!(message.contains("another connection"), "{message}");

    // No proof at all (a client of the previous protocol).
    let mut raw = Raw::connect(&c).await?;
    let (code, message) = refused(raw.open(&c.token, None).await?)?;
    assert_eq!(code, ErrorCode::Unauthorized);
    assert!(
        message.contains("identity proof does not hold"),
        "{message}"
    );

    // The thief, under its own id, naming the victim's member id: a new member, not the victim.
    let mut raw = Raw::connect(&c).await?;
    let proof = forge_coordinator::client::prove_identity(&thief, &raw.challenge()?);
    raw.open(&c.token, Some(proof)).await?;
    let answer = raw
        .join(Join {
            capabilities: capabilities(peer_id(&thief)),
            rejoin: Some(victim_joined.member),
        })
        .await?;
    let CoordinatorMessage::JoinAccepted(thief_joined) = answer else {
        bail!("the thief's own join was answered {answer:?}");
    };
    assert_ne!(thief_joined.member, victim_joined.member);

    let members = member_peer_ids(&c).await?;
    assert!(
        members.contains(&(victim_joined.member, peer_id(&victim))),
        "the victim is no longer a member: {members:?}"
    );
    assert_eq!(members.len(), 2, "{members:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_gets_its_connections_streams_and_joins_and_no_more() -> anyhow::Result<()> {
    let c = coordinator("max_connections_per_ip = 4\njoins_per_ip_per_s = 2\n").await?;
    // Four connections are held open; the fifth is closed with the reason.
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(Raw::connect(&c).await?);
    }
    let fifth = Raw::connect(&c).await;
    let reason = match fifth {
        Ok(raw) => raw.connection.closed().await.to_string(),
        Err(err) => format!("{err:#}"),
    };
    assert!(reason.contains("max_connections_per_ip"), "{reason}");
    // A connection is one stream: a second one is never granted (quinn keeps no state for more).
    let second = tokio::time::timeout(Duration::from_millis(500), held[0].connection.open_bi());
    assert!(second.await.is_err(), "a second stream was granted");
    for raw in held {
        raw.close().await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Two joins pass; the third within the second is refused for its rate.
    let mut joined = Vec::new();
    for index in 0..2 {
        joined.push(honest(&c, named_keypair(&format!("fast-{index}"))).await?);
    }
    let mut raw = Raw::connect(&c).await?;
    let key = named_keypair("fast-2");
    let proof = forge_coordinator::client::prove_identity(&key, &raw.challenge()?);
    let (code, message) = refused(raw.open(&c.token, Some(proof)).await?)?;
    assert_eq!(code, ErrorCode::RateLimited);
    assert!(message.contains("joins_per_ip_per_s"), "{message}");
    raw.close().await;
    // The client library waits and tries again by itself.
    joined.push(honest(&c, key).await?);
    // Three members and this status query: within the four connections.
    assert_eq!(member_peer_ids(&c).await?.len(), 3);
    Ok(())
}

/// A join with a peer id that is no libp2p id (`sim-0`, which once made every node exit), and
/// one with 1,000 listen addresses (which every other member's peer list would carry), are
/// refused with the reason; the honest member stays and nobody else hears of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_or_oversized_join_is_refused_and_the_member_stays() -> anyhow::Result<()> {
    let c = coordinator("").await?;
    let (_member, joined) = honest(&c, named_keypair("member")).await?;
    let key = named_keypair("hostile");

    let mut raw = Raw::connect(&c).await?;
    let proof = forge_coordinator::client::prove_identity(&key, &raw.challenge()?);
    raw.open(&c.token, Some(proof)).await?;
    let answer = raw
        .join(Join {
            capabilities: capabilities("sim-0".to_string()),
            rejoin: None,
        })
        .await?;
    let CoordinatorMessage::Error(error) = answer else {
        bail!("a join as sim-0 was answered {answer:?}");
    };
    assert_eq!(error.code, ErrorCode::Unauthorized, "{}", error.message);

    let mut raw = Raw::connect(&c).await?;
    let proof = forge_coordinator::client::prove_identity(&key, &raw.challenge()?);
    raw.open(&c.token, Some(proof)).await?;
    let mut oversized = capabilities(peer_id(&key));
    oversized.listen_addrs = vec!["/ip4/127.0.0.1/udp/1/quic-v1".to_string(); 1000];
    let answer = raw
        .join(Join {
            capabilities: oversized,
            rejoin: None,
        })
        .await?;
    let CoordinatorMessage::Error(error) = answer else {
        bail!("an oversized join was answered {answer:?}");
    };
    assert_eq!(error.code, ErrorCode::InvalidJoin);
    assert!(
        error.message.contains("16 are allowed"),
        "{}",
        error.message
    );

    let members = member_peer_ids(&c).await?;
    assert_eq!(
        members,
        vec![(joined.member, peer_id(&named_keypair("member")))]
    );
    Ok(())
}
