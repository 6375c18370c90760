use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use dropctl::api::Api;
use dropctl::drill::{self, DropPlan, DropReport};
use dropctl::invariants::{self, CheckOptions};
use dropctl::prometheus::Prometheus;
use dropctl::quiet::{self, PipelineArgs, Quiet};
use dropctl::tokens::TokenArgs;
use dropline::auth::Audience;
use dropline::config::{KafkaArgs, MysqlArgs, RedisArgs};
use dropline::kafka::{Publisher, WhenFull};
use dropline::stock::Ledger;
use sqlx::MySqlPool;

/// Dropline's operator tool.
#[derive(Parser)]
#[command(name = "dropctl", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per run: the demo's many flags cost nothing worth boxing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Creates the database if needed and applies the migrations.
    Migrate {
        #[command(flatten)]
        mysql: MysqlArgs,
    },
    /// Creates Dropline's topics that do not exist yet.
    Topics {
        #[command(flatten)]
        kafka: KafkaArgs,
    },
    /// Prints a bearer token for a buyer, or with --admin for an admin
    /// (signed with the admin secret, for the admin audience).
    Token {
        /// Whose token: the buyer's id (an admin token defaults to `admin`).
        #[arg(long)]
        user: Option<String>,
        #[arg(long)]
        admin: bool,
        #[arg(long, default_value_t = 3600)]
        ttl_secs: i64,
        /// Prints this many tokens, one per line, for the users
        /// `<user>-0`, `<user>-1`, ... (load tests of per-buyer paths).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        count: Option<u64>,
        #[command(flatten)]
        secrets: TokenArgs,
    },
    /// Runs a flash sale against a running deployment and checks the books.
    Demo {
        #[arg(long, env = "DROPLINE_INGRESS_URL", default_value = "http://127.0.0.1:8080")]
        ingress_url: String,
        #[command(flatten)]
        secrets: TokenArgs,
        /// Tickets on sale: the event's capacity.
        #[arg(long, default_value_t = 500)]
        tickets: u32,
        /// Tickets the host accepts to sell beyond the capacity, counting
        /// on no-shows (the event's oversell allowance); shown as oversold.
        #[arg(long, default_value_t = 10)]
        oversell_allowance: u32,
        /// Buyers arriving at once; more than the tickets.
        #[arg(long, default_value_t = 2_000)]
        buyers: u32,
        /// Buyers in flight at once.
        #[arg(long, default_value_t = 256)]
        concurrency: usize,
        /// How long a buyer has to pay.
        #[arg(long, default_value_t = 10)]
        hold_ttl_secs: u32,
        /// Share of holders who pay.
        #[arg(long, default_value_t = 0.6)]
        pay_share: f64,
        /// Share of holders who cancel; the rest walk away.
        #[arg(long, default_value_t = 0.15)]
        cancel_share: f64,
        /// Share of holders who open their payment in time and complete it
        /// after their hold expired: their money goes back through the
        /// provider.
        #[arg(long, default_value_t = 0.05)]
        late_pay_share: f64,
        /// Share of the payers the payment provider gives trouble, in three
        /// equal parts: a declined card (they try again and pay), a
        /// confirmation that times out (they confirm again), a payment
        /// confirmed twice. Each still makes one paid order.
        #[arg(long, default_value_t = 0.15)]
        payment_trouble_share: f64,
        /// Share of the payers who then cancel their paid order, within the
        /// event's cancellation policy: their tickets go back on sale and
        /// 80% of the price is refunded through the provider.
        #[arg(long, default_value_t = 0.05)]
        paid_cancel_share: f64,
        /// Buyers the waiting room lets through per second.
        #[arg(long, default_value_t = 250)]
        outflow_per_sec: u32,
        /// How long an admitted buyer has to buy.
        #[arg(long, default_value_t = 30)]
        time_to_act_secs: u32,
        /// Zero bits of the proof of work each buyer solves to join the
        /// waiting room (0: none).
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u8).range(0..=28))]
        proof_of_work_bits: u8,
        /// Sell first come, first served at the purchase endpoint, without
        /// a waiting room.
        #[arg(long)]
        no_waiting_room: bool,
        /// How long the pre-queue gathers before the sale opens and it is
        /// drawn (a room is set at least 5 s before its opening).
        #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(6..=3600))]
        opens_in_secs: u32,
        /// Also write the drop's figures to this file as JSON (for
        /// scripts/bench.sh).
        #[arg(long)]
        summary_json: Option<std::path::PathBuf>,
        /// Prometheus scraping the services, for the headline numbers.
        #[arg(long, env = "DROPLINE_PROMETHEUS_URL", default_value = "http://127.0.0.1:9090")]
        prometheus_url: String,
        /// The host's webhook receiver (`dropctl receive`), for what the
        /// notifier delivered.
        #[arg(long, env = "DROPLINE_RECEIVER_URL", default_value = "http://127.0.0.1:9180")]
        receiver_url: String,
        /// The books are checked once the consumer groups have caught up.
        #[command(flatten)]
        books: Books,
    },
    /// Load for the performance report that wrk cannot make (see
    /// scripts/bench.sh); prints JSON.
    Load {
        #[arg(long, env = "DROPLINE_INGRESS_URL", default_value = "http://127.0.0.1:8080")]
        ingress_url: String,
        #[command(flatten)]
        secrets: TokenArgs,
        #[command(subcommand)]
        what: Load,
    },
    /// Measures a ceiling for the performance report (see scripts/bench.sh).
    Ceiling {
        #[command(subcommand)]
        what: Ceiling,
    },
    /// Rebuilds an event's stock ledger in Redis from MySQL, with the event's
    /// sales fenced meanwhile (the settlers also do this by themselves when
    /// they find a current event's ledger missing).
    Rebuild {
        #[arg(long)]
        event: u64,
        /// The settlers' consumer group, whose progress proves MySQL has
        /// everything Kafka carried.
        #[arg(long, env = "DROPLINE_SETTLER_GROUP", default_value = "dropline-settler")]
        settler_group: String,
        /// How long an allocator's in-flight mark counts without renewal
        /// before the rebuild takes that allocator for dead.
        #[arg(long, default_value_t = 6_000, value_parser = clap::value_parser!(u64).range(3_000..))]
        grace_ms: u64,
        #[arg(long, default_value_t = 120)]
        timeout_secs: u64,
        #[command(flatten)]
        kafka: KafkaArgs,
        #[command(flatten)]
        mysql: MysqlArgs,
        #[command(flatten)]
        redis: RedisArgs,
    },
    /// Fetches an event's published draw from the ingress and checks it:
    /// the seed against the commitment, the tickets against the list hash,
    /// and every place against the order the seed and the list give.
    VerifyDraw {
        event: u64,
        #[arg(long, env = "DROPLINE_INGRESS_URL", default_value = "http://127.0.0.1:8080")]
        ingress_url: String,
        /// Also say where this ticket was placed (and fail if it was not
        /// in the draw).
        #[arg(long)]
        ticket: Option<uuid::Uuid>,
        /// Check a draw saved from `GET /v1/events/{id}/waiting-room/draw`
        /// instead of fetching it.
        #[arg(long)]
        file: Option<std::path::PathBuf>,
    },
    /// Runs a webhook receiver for the notifier (the host's end, on the
    /// local stack): it verifies each webhook's signature, deduplicates on
    /// its id, and shows what it received at `GET /deliveries`.
    Receive {
        #[arg(long, env = "DROPLINE_RECEIVER_ADDR", default_value = "127.0.0.1:9180")]
        listen: std::net::SocketAddr,
        /// The notifier's signing secret (DROPLINE_NOTIFY_SECRET).
        #[arg(long, env = "DROPLINE_NOTIFY_SECRET", hide_env_values = true)]
        notify_secret: Option<dropline::secrets::Secret>,
        /// A file every webhook received is appended to (JSON lines) and
        /// read back from at start, so a restart forgets nothing; none:
        /// memory only.
        #[arg(long, env = "DROPLINE_RECEIVER_RECORD")]
        record: Option<std::path::PathBuf>,
    },
    /// Checks an event's invariants against MySQL and Redis.
    Check {
        #[arg(long)]
        event: u64,
        /// How long past its deadline a hold may end, or still be held
        /// (default: the settler's default overdue grace).
        #[arg(long)]
        grace_secs: Option<u64>,
        /// First wait up to this long for the pipeline to go quiet: every
        /// consumer group caught up, every deadline of the event passed, no
        /// hold within its grace window.
        #[arg(long, default_value_t = 0)]
        wait_secs: u64,
        /// Purchases the ingress accepted (202) for the event, when known:
        /// the record must have exactly this many decisions.
        #[arg(long)]
        accepted: Option<u64>,
        #[command(flatten)]
        books: Books,
    },
}

/// Where a drop's books are: the deployment's broker and consumer groups,
/// MySQL and the Redis ledger.
#[derive(Args)]
struct Books {
    #[command(flatten)]
    pipeline: PipelineArgs,
    /// The payment provider's API (paysim's shape: `GET /v1/refunds`): its
    /// refunds are compared with the record's. Unset: the record's side
    /// only. A flag, not the stages' DROPLINE_PAYMENT_PROVIDER_URL: a check
    /// run beside a stage must not call the real provider.
    #[arg(long)]
    payment_provider_url: Option<String>,
    #[command(flatten)]
    mysql: MysqlArgs,
    #[command(flatten)]
    redis: RedisArgs,
}

impl Books {
    async fn open(&self) -> anyhow::Result<(MySqlPool, Ledger)> {
        open_books(&self.mysql, &self.redis).await
    }
}

async fn open_books(mysql: &MysqlArgs, redis: &RedisArgs) -> anyhow::Result<(MySqlPool, Ledger)> {
    Ok((dropline::db::connect(mysql).await?, Ledger::new(redis.pool()?, &redis.key_prefix)))
}

#[derive(Subcommand)]
enum Load {
    /// Buyers following their purchases on event streams at once, with the
    /// allocator paused until every stream is open: the ingress' memory per
    /// stream, and each decision's time to reach its stream.
    Streams {
        #[arg(long, default_value_t = 10_000)]
        streams: u32,
        /// The ingress process, whose memory is read.
        #[arg(long)]
        ingress_pid: u32,
        /// The (only) allocator process, paused meanwhile.
        #[arg(long)]
        allocator_pid: u32,
    },
    /// Creates an event of one unit, buys and pays for it; prints its id.
    SoldOut,
    /// Purchases at a fixed rate, open loop, timed from when each was due.
    Paced {
        #[arg(long)]
        rate: f64,
        #[arg(long, default_value_t = 15.0)]
        secs: f64,
    },
}

#[derive(Subcommand)]
enum Ceiling {
    /// A bare hyper server answering 202, until stopped.
    Http {
        #[arg(long, default_value = "127.0.0.1:8181")]
        addr: std::net::SocketAddr,
    },
    /// Raw produce rate with the stages' producer settings; prints JSON.
    /// Also loads a topic with intents or decisions for a stage benchmark.
    Produce {
        #[arg(long, value_enum, default_value = "intent")]
        payload: dropctl::ceiling::Payload,
        #[arg(long, default_value_t = 1)]
        event: u64,
        /// Spread the messages over this many events from --event, in turn.
        #[arg(long, default_value_t = 1)]
        events: u64,
        #[arg(long, default_value_t = 100_000)]
        messages: u64,
        #[arg(long, default_value_t = 1_000)]
        in_flight: usize,
        #[arg(long, default_value = "dropline-ceiling.produce")]
        topic: String,
        #[command(flatten)]
        kafka: KafkaArgs,
    },
    /// Multi-row INSERT rate into MariaDB; prints JSON.
    Insert {
        #[arg(long, default_value_t = 100_000)]
        rows: u64,
        #[arg(long, default_value_t = 500)]
        batch: usize,
        #[command(flatten)]
        mysql: MysqlArgs,
    },
    /// The settler's batch writer with the record's outbox and without it,
    /// on scratch databases named after --mysql-url's (`_with`,
    /// `_without`); prints JSON.
    Outbox {
        #[arg(long, default_value_t = 20_000)]
        orders: u32,
        #[arg(long, default_value_t = 500)]
        batch: usize,
        /// Rounds on each side, interleaved; each side's best counts.
        #[arg(long, default_value_t = 3)]
        rounds: u32,
        #[command(flatten)]
        mysql: MysqlArgs,
    },
    /// One transaction per purchase on a hot stock row; prints JSON.
    Naive {
        #[arg(long, default_value_t = 5_000)]
        purchases: u64,
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        #[command(flatten)]
        mysql: MysqlArgs,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Cli::parse().command).await {
        Ok(()) => ExitCode::SUCCESS,
        // The error with its causes, on one line, and never a backtrace: a
        // RUST_BACKTRACE set for other tools would bury a check's verdict
        // under frames.
        Err(e) => {
            eprintln!("Error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Migrate { mysql } => {
            dropline::db::create_database(&mysql.url).await.context("creating the database")?;
            let db = dropline::db::connect(&mysql).await?;
            dropline::db::migrate(&db).await?;
            eprintln!("migrations applied");
        }
        Command::Topics { kafka } => {
            let topics = kafka.topics();
            dropline::kafka::ensure_topics(&kafka, &topics.all()).await?;
            eprintln!("topics ready: {}", topics.all().join(", "));
        }
        Command::Token { user, admin, ttl_secs, count, secrets } => {
            let audience = if admin { Audience::Admin } else { Audience::Buyer };
            let user = match (user, admin) {
                (Some(user), _) => user,
                (None, true) => "admin".to_owned(),
                (None, false) => anyhow::bail!("a buyer's token needs --user <id>"),
            };
            let keys = secrets.keys(audience)?;
            match count {
                None => println!("{}", keys.mint(&user, ttl_secs)?),
                Some(count) => {
                    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
                    for i in 0..count {
                        writeln!(out, "{}", keys.mint(&format!("{user}-{i}"), ttl_secs)?)?;
                    }
                    out.flush()?;
                }
            }
        }
        Command::Demo {
            ingress_url,
            secrets,
            tickets,
            oversell_allowance,
            buyers,
            concurrency,
            hold_ttl_secs,
            pay_share,
            cancel_share,
            late_pay_share,
            payment_trouble_share,
            paid_cancel_share,
            outflow_per_sec,
            time_to_act_secs,
            proof_of_work_bits,
            no_waiting_room,
            opens_in_secs,
            summary_json,
            prometheus_url,
            receiver_url,
            books,
        } => {
            let tokens = secrets.tokens()?;
            let plan = DropPlan {
                tickets,
                oversell_allowance,
                buyers,
                concurrency,
                hold_ttl_secs,
                per_user_limit: 2,
                pay_share,
                cancel_share,
                late_pay_share,
                payment_trouble_share,
                paid_cancel_share,
                webhook_copies: 1,
                user_prefix: format!("demo-{}-", chrono::Utc::now().timestamp()),
                grace: invariants::production_grace(),
                pipeline: Some(books.pipeline.clone()),
                provider: books.payment_provider_url.clone(),
                room: (!no_waiting_room).then_some(drill::RoomPlan {
                    opens_in_secs,
                    outflow_per_sec,
                    time_to_act_secs,
                    proof_of_work_bits,
                }),
            };
            let (db, ledger) = books.open().await?;
            let api = Api::new(&ingress_url)?;
            eprintln!(
                "dropline demo: {tickets} tickets and an oversell allowance of {oversell_allowance}, {buyers} buyers \
                 ({concurrency} at once), holds last {hold_ttl_secs}s"
            );
            if let Some(room) = &plan.room {
                eprintln!(
                    "waiting room: every buyer solves a {}-bit proof of work and joins the pre-queue; the sale opens \
                     and the draw is made in {}s; {} buyers let through a second, {}s each to buy",
                    room.proof_of_work_bits, room.opens_in_secs, room.outflow_per_sec, room.time_to_act_secs
                );
            }
            let event_id = drill::open(&api, &tokens, &plan).await?;
            if plan.room.is_some() {
                // A spectator's seat: not one of the drill's buyers.
                let watcher = tokens.buyer.mint(&format!("{}watcher", plan.user_prefix), 3600)?;
                eprintln!("waiting-room page (open it now to join too): {ingress_url}/waiting-room/{event_id}#token={watcher}");
            }
            let report = drill::play(&api, &tokens, &db, &ledger, &plan, event_id).await?;
            print_report(&report);
            if let Some(path) = summary_json {
                std::fs::write(&path, serde_json::to_vec_pretty(&summary(&report))?)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            print_headline(&prometheus_url, &report).await;
            print_notifications(&receiver_url, report.event_id).await;
            if !report.passed() {
                anyhow::bail!("the drop did not balance");
            }
        }
        Command::Rebuild { event, settler_group, grace_ms, timeout_secs, kafka, mysql, redis } => {
            let (db, ledger) = open_books(&mysql, &redis).await?;
            let options = dropline_settler::rebuild::RebuildOptions {
                settler_group,
                in_flight_grace: Duration::from_millis(grace_ms),
                catch_up_timeout: Duration::from_secs(timeout_secs),
                fence_ttl_secs: timeout_secs + 60,
            };
            let publisher = Publisher::new(&kafka, "dropctl-producer", WhenFull::Wait)?;
            let topics = kafka.topics();
            let broker = dropline_settler::rebuild::Broker { kafka: &kafka, publisher: &publisher, topics: &topics };
            let levels = dropline_settler::rebuild::rebuild(
                &db,
                &ledger,
                &broker,
                &options,
                event,
                "an operator asked (dropctl rebuild)",
                &dropline::shutdown::on_signals(),
            )
            .await?;
            println!(
                "event {event} rebuilt: available {} + held {} + sold {} = capacity {} + allowance {}",
                levels.available, levels.held, levels.sold, levels.capacity, levels.allowance
            );
        }
        Command::Load { ingress_url, secrets, what } => {
            let (api, tokens) = (Api::new(&ingress_url)?, secrets.tokens()?);
            let report = match what {
                Load::Streams { streams, ingress_pid, allocator_pid } => serde_json::to_string(
                    &dropctl::load::streams(&api, &tokens, streams, ingress_pid, allocator_pid).await?,
                )?,
                Load::SoldOut => dropctl::load::sold_out(&api, &tokens).await?.to_string(),
                Load::Paced { rate, secs } => {
                    serde_json::to_string(&dropctl::load::paced(&api, &tokens, rate, secs).await?)?
                }
            };
            println!("{report}");
        }
        Command::Ceiling { what } => {
            let measured = match what {
                Ceiling::Http { addr } => return dropctl::ceiling::http(addr).await,
                Ceiling::Produce { payload, event, events, messages, in_flight, topic, kafka } => serde_json::to_value(
                    dropctl::ceiling::produce(&kafka, &topic, payload, event, events, messages, in_flight).await?,
                )?,
                Ceiling::Insert { rows, batch, mysql } => {
                    serde_json::to_value(dropctl::ceiling::insert(&mysql, rows, batch).await?)?
                }
                Ceiling::Naive { purchases, concurrency, mysql } => {
                    serde_json::to_value(dropctl::ceiling::naive(&mysql, purchases, concurrency).await?)?
                }
                Ceiling::Outbox { orders, batch, rounds, mysql } => {
                    serde_json::to_value(dropctl::ceiling::outbox(&mysql, orders, batch, rounds).await?)?
                }
            };
            println!("{}", serde_json::to_string(&measured)?);
        }
        Command::VerifyDraw { event, ingress_url, ticket, file } => {
            let draw: dropline::room::draw::PublishedDraw = match file {
                Some(path) => serde_json::from_slice(&std::fs::read(&path)?)
                    .with_context(|| format!("{} is not a published draw", path.display()))?,
                None => Api::new(&ingress_url)?.draw(event).await?,
            };
            // A reader that stops early (`| head`) ends the output, not the
            // check: a closed pipe is no error here.
            let mut out = std::io::stdout().lock();
            macro_rules! say {
                ($out:expr, $($arg:tt)*) => {{
                    let _ = writeln!($out, $($arg)*);
                }};
            }
            if draw.event_id != event {
                anyhow::bail!("the draw is event {}'s, not event {event}'s", draw.event_id);
            }
            dropline::room::draw::verify(&draw)
                .map_err(|e| anyhow::anyhow!("event {event}'s draw does not hold: {e}"))?;
            say!(
                out,
                "event {event}: the draw of {} tickets holds\n  seed {} matches its commitment {}\n  list hash {}\n  \
                 every place recomputed from the seed and the list",
                draw.order.len(),
                draw.seed,
                draw.seed_commitment,
                draw.list_hash
            );
            if let Some(beacon) = &draw.beacon {
                say!(
                    out,
                    "  mixed with round {} of the beacon {:?}, randomness {}: check that the beacon published it",
                    beacon.round,
                    beacon.name,
                    beacon.randomness.as_deref().unwrap_or("(none)")
                );
            }
            if let Some(ticket) = ticket {
                let place = draw.order.iter().position(|t| *t == ticket);
                let place = place.with_context(|| format!("ticket {ticket} is not in the draw"))?;
                say!(out, "  ticket {ticket}: place {} of {}", place + 1, draw.order.len());
            }
        }
        Command::Receive { listen, notify_secret, record } => {
            let mut p = dropline::config::Problems::default();
            dropline::secrets::check_setting("DROPLINE_NOTIFY_SECRET", &notify_secret, &mut p);
            p.into_result()?;
            let listener = tokio::net::TcpListener::bind(listen).await?;
            eprintln!("webhook receiver on {}", listener.local_addr()?);
            let secret = dropline::secrets::exposed(&notify_secret).to_vec();
            let inbox = match &record {
                Some(path) => dropctl::receiver::Inbox::recorded(path)
                    .with_context(|| format!("opening the record {}", path.display()))?,
                None => dropctl::receiver::Inbox::default(),
            };
            let inbox = std::sync::Arc::new(inbox);
            dropctl::receiver::serve(listener, secret, inbox, dropline::shutdown::on_signals()).await;
        }
        Command::Check { event, grace_secs, wait_secs, accepted, books } => {
            let (db, ledger) = books.open().await?;
            let grace = grace_secs.map_or_else(invariants::production_grace, Duration::from_secs);
            let settle = Quiet {
                pipeline: Some(books.pipeline),
                past_deadlines: true,
                grace,
                timeout: Duration::from_secs(wait_secs),
            };
            if wait_secs > 0 && !quiet::wait_quiet(&db, event, &settle).await? {
                eprintln!("the pipeline did not go quiet within {wait_secs}s; checking anyway");
            }
            let options =
                CheckOptions { accepted, acknowledged_payments: None, grace, provider: books.payment_provider_url };
            let verdict = invariants::verify(&db, &ledger, event, &options).await?;
            println!("event {event}:\n{verdict}");
            if !verdict.all_hold() {
                anyhow::bail!(
                    "invariants do not hold: {}",
                    verdict.failing().iter().map(|r| r.id()).collect::<Vec<_>>().join(", ")
                );
            }
        }
    }
    Ok(())
}

/// Prints what Prometheus saw of the drop. The demo still passes or fails
/// on the books alone: a missing Prometheus only costs these numbers.
async fn print_headline(url: &str, r: &DropReport) {
    let prom = match Prometheus::new(url) {
        Ok(p) if p.ready().await => p,
        _ => {
            println!("prometheus: not reachable at {url}; no headline numbers");
            return;
        }
    };
    match dropctl::prometheus::headline(&prom, r.started_at, r.ended_at).await {
        Ok(h) => {
            let show = |v: Option<f64>, unit: &str, scale: f64| {
                v.map_or("no data".to_owned(), |v| format!("{:.1}{unit}", v * scale))
            };
            println!("from prometheus ({url}):");
            println!("  peak admitted purchases: {}", show(h.peak_admitted_per_sec, "/s", 1.0));
            println!("  p99 intent-to-decision latency: {}", show(h.p99_decision_secs, " ms", 1000.0));
        }
        Err(e) => println!("prometheus: {e:#}"),
    }
}

/// What the host's receiver got for the event: by then the notifier had
/// settled every change (the check waited for it).
async fn print_notifications(url: &str, event_id: u64) {
    let report = async {
        let r = reqwest::get(format!("{url}/deliveries")).await?.error_for_status()?;
        r.json::<dropctl::receiver::Report>().await
    };
    let report = match report.await {
        Ok(r) => r,
        Err(e) => {
            println!("webhook receiver: not reachable at {url} ({e}); no delivery summary");
            return;
        }
    };
    let mut by_type = std::collections::BTreeMap::<String, u64>::new();
    for d in report.deliveries.iter().filter(|d| d.event_id == event_id) {
        *by_type.entry(d.kind.clone()).or_default() += 1;
    }
    let total: u64 = by_type.values().sum();
    let kinds: Vec<String> = by_type.iter().map(|(k, n)| format!("{k} {n}")).collect();
    println!("notifications (the host's receiver, {url}):");
    println!("  {total} webhooks for this event, each id once: {}", kinds.join(", "));
    println!(
        "  since the receiver started: {} copies deduplicated, {} refused for a bad signature",
        report.summary.duplicates, report.summary.bad_signatures
    );
}

/// A drop's figures, as scripts/bench.sh reads them.
fn summary(r: &DropReport) -> serde_json::Value {
    let ms = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1000.0);
    serde_json::json!({
        "event_id": r.event_id,
        "tickets": r.tickets,
        "oversell_allowance": r.oversell_allowance,
        "buyers": r.buyers,
        "accepted": r.accepted,
        "held": r.held,
        "flood_secs": r.flood_secs,
        "sell_out_secs": r.sell_out_secs,
        "entrants": r.draw.as_ref().map(|d| d.entrants),
        "draw_holds": r.draw.as_ref().map(|d| d.mismatch.is_none()),
        "draw_secs_after_opening": r.draw.as_ref().and_then(|d| d.secs_after_opening),
        "streamed": r.line.as_ref().map(|l| l.streamed),
        "sold_out_p99_ms": r.line.as_ref().and_then(|l| ms(l.sold_out_p99)),
        "told_sold_out": r.line.as_ref().map(|l| l.told_sold_out),
        "eta_error_p90": r.line.as_ref().and_then(|l| l.eta_error_p90),
        "estimated": r.line.as_ref().map(|l| l.estimated),
        "invariants_hold": r.verdict.as_ref().is_some_and(|v| v.all_hold()),
        "settled": r.settled,
        "passed": r.passed(),
        "sold_out_exactly": r.sold_out_exactly(),
    })
}

fn print_report(r: &DropReport) {
    let list = |v: &[(String, u64)]| {
        if v.is_empty() {
            "none".to_owned()
        } else {
            v.iter().map(|(k, n)| format!("{k} {n}")).collect::<Vec<_>>().join(", ")
        }
    };
    let m = r.final_counts();
    println!();
    println!("== Dropline flash-sale demo: event {} ==", r.event_id);
    println!("tickets {} and an oversell allowance of {}, buyers {}", r.tickets, r.oversell_allowance, r.buyers);
    println!(
        "flood: {} purchases accepted (202) in {:.2}s; refused at the door: {}",
        r.accepted,
        r.flood_secs,
        list(&r.refused_at_door)
    );
    if let Some(d) = &r.draw {
        println!(
            "waiting room: {} of {} buyers drawn from the pre-queue{}; the draw {} (seed commitment {})",
            d.buyers_drawn,
            r.buyers,
            d.secs_after_opening.map_or(String::new(), |s| format!(", {s:.2}s after the opening")),
            d.mismatch.as_ref().map_or("holds".to_owned(), |m| format!("DOES NOT HOLD: {m}")),
            d.seed_commitment
        );
        println!(
            "  check it yourself (with the stack up: scripts/stack.sh up): target/release/dropctl verify-draw {}",
            r.event_id
        );
    }
    if let Some(l) = &r.line {
        let secs = |d: Option<Duration>| d.map_or("-".to_owned(), |d| format!("{:.2}s", d.as_secs_f64()));
        println!(
            "live line: {} of {} buyers followed their ticket on its event stream ({} events); sold-out reached {} \
             waiting buyers (p99 {} after the last hold); first wait estimates off by {} at p90 ({} buyers)",
            l.streamed,
            r.buyers,
            l.events,
            l.told_sold_out,
            secs(l.sold_out_p99),
            l.eta_error_p90.map_or("-".to_owned(), |e| format!("{:.0}%", e * 100.0)),
            l.estimated
        );
    }
    println!("decisions: held {}, rejected: {}", r.held, list(&r.rejected));
    if let Some(secs) = r.sell_out_secs {
        let from = if r.draw.is_some() { "the sale's opening" } else { "the flood's start" };
        println!("time to sell out: {secs:.1} s (from {from} to the last unit's hold, by the allocator's clock)");
    }
    println!(
        "at sell-out: Redis available {} held {} sold {}; MySQL held {}",
        r.at_sellout_redis.available, r.at_sellout_redis.held, r.at_sellout_redis.sold, r.at_sellout_mysql_held
    );
    println!(
        "holders then: {} paid, {} cancelled, {} walked away, {} too late, {} voided ({} payments to refund)",
        r.paid, r.cancelled, r.walked_away, r.too_late, r.voided, r.refunds
    );
    let t = &r.troubles;
    println!(
        "provider trouble, paid all the same: {} after a declined card, {} after a timeout, {} confirmed twice",
        t.declined_then_paid, t.timed_out_then_paid, t.confirmed_twice
    );
    println!(
        "cancelled after paying, within the policy: {} ({}% of the price refunded)",
        r.cancelled_after_paying,
        drill::POLICY_REFUND_PERCENT
    );
    println!(
        "refunds through the provider: {} requested, {} made, {} waiting",
        m.refund_rows,
        m.refund_rows - m.refunds_waiting.min(m.refund_rows),
        m.refunds_waiting
    );
    println!(
        "final (MySQL): sold {}, cancelled {}, expired {}, voided {}, still held {}",
        m.paid, m.cancelled, m.expired, m.voided, m.held
    );
    println!("oversold (beyond the capacity, within the allowance of {}): {}", r.oversell_allowance, r.oversold());
    println!("pipeline settled: {}", if r.settled { "yes" } else { "NO" });
    if let Some(v) = &r.verdict {
        println!("invariants:\n{v}");
    }
    println!("sold out with exactly {} held: {}", r.units(), if r.sold_out_exactly() { "yes" } else { "NO" });
    // A run whose holds lapsed before every buyer was answered (a stage was
    // down, or the pipeline fell behind the hold TTL) sells their units
    // again: correct, but not the clean sell-out a healthy stack gives.
    let result = match (r.passed(), r.sold_out_exactly()) {
        (false, _) => "FAIL".to_owned(),
        (true, true) => "PASS".to_owned(),
        (true, false) => format!(
            "PASS, every invariant holds; not a clean sell-out: more than {} holds were granted, as some lapsed \
             before every buyer was answered and their units went back on sale",
            r.units()
        ),
    };
    println!("result: {result}");
}
