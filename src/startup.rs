//! Builds the application on any `TcpListener`: worker pools, the Dispatcher on its own arbiter,
//! and the HTTP server. Tests bind `127.0.0.1:0` and read the port back.

use std::collections::HashMap;
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use actix_web::dev::Server;
use actix_web::{middleware, web, App, HttpServer};

use crate::access::{ApiKeys, KeySecrets};
use crate::async_io::webhooks::Deliver;
use crate::async_io::webhooks::Signing;
use crate::async_io::{self, AsyncIo};
use crate::configuration::{Settings, StoreKind, StoreSettings};
use crate::dispatch::{Admission, Dispatcher, Observers, Pool};
use crate::domain::callback::CallbackPolicy;
use crate::job::{JobKind, Owner};
use crate::kind::Runner;
use crate::kinds::image::routes::UploadLimits;
use crate::kinds::image::task::ImageLimits;
use crate::kinds::image::ImageKind;
use crate::kinds::pdf::spec::{RenderBudget, SpecLimits};
use crate::kinds::pdf::PdfKind;
use crate::metrics::{self, Metrics};
use crate::realtime::{Hub, WsSettings};
use crate::routes;
use crate::shutdown;
use crate::store::{JobStore, MemoryStore, Retention, SqliteOptions, SqliteStore};
use crate::workers::JobWorker;

pub struct Application {
    port: u16,
    server: Server,
    dispatcher: Addr<Dispatcher>,
    /// Told when the process is about to exit cleanly.
    store: Arc<dyn JobStore>,
    /// How long accepted jobs get to finish after a shutdown signal.
    grace: Duration,
}

impl Application {
    /// Binds `settings.server.bind` and builds everything.
    pub async fn build(settings: Settings) -> std::io::Result<Self> {
        let listener = TcpListener::bind(settings.server.bind)?;
        Self::with_listener(settings, listener)
    }

    /// Builds everything on an already bound listener, with the built-in kinds. Needs a running
    /// actix `System`.
    pub fn with_listener(settings: Settings, listener: TcpListener) -> std::io::Result<Self> {
        Self::with_kinds(settings, listener, Vec::new())
    }

    /// [`Application::with_listener`] with kinds of your own beside the built-in ones.
    pub fn with_kinds(
        settings: Settings,
        listener: TcpListener,
        extra: Vec<KindRegistration>,
    ) -> std::io::Result<Self> {
        let mut kinds = builtin_kinds(&settings);
        kinds.extend(extra);
        for kind in &kinds {
            if JobKind::named(kind.runner.name()).is_none() {
                return Err(std::io::Error::other(format!("{:?} cannot name a kind", kind.runner.name())));
            }
            if kinds.iter().filter(|k| k.runner.name() == kind.runner.name()).count() > 1 {
                return Err(std::io::Error::other(format!("the kind {:?} is registered twice", kind.runner.name())));
            }
        }
        let address = listener.local_addr()?;
        let keys = settings.access.api_keys.as_ref().map(|k| k.expose().parse::<ApiKeys>()).transpose();
        let keys = keys.map_err(|e| std::io::Error::other(format!("--api-keys: {e}")))?;
        let access = crate::access::Access { keys: keys.map(Arc::new) };
        match &access.keys {
            Some(keys) => tracing::info!(keys = keys.len(), "API keys required on every API route"),
            None if !address.ip().is_loopback() => tracing::warn!(
                "no --api-keys: the service is open to anyone who can reach {address}, and every client sees every job"
            ),
            None => {}
        }
        let signing = webhook_signing(&settings, access.keys.as_deref())?;
        if access.keys.is_none() && settings.admission.max_pending_per_key.is_some() {
            tracing::warn!("--max-pending-per-key has no effect without --api-keys");
        }
        let metrics = Arc::new(Metrics::new());
        let store = open_store(&settings.store, metrics.clone())?;
        let io = async_io::start(&settings, signing.clone(), metrics.clone(), store.clone());
        let owed = store.owed_webhooks().map_err(|e| std::io::Error::other(e.to_string()))?;
        if !owed.is_empty() {
            tracing::info!(owed = owed.len(), "delivering webhooks owed from before the restart");
        }
        for w in owed {
            io.webhooks.do_send(Deliver { job: w.job, owner: w.owner, url: w.url, body: w.body });
        }
        let hub = Arc::new(Hub::new());
        let app_store = store.clone();
        // `--max-pending-per-key` counts the jobs recovered by a durable store for their keys.
        let owners = match settings.admission.max_pending_per_key {
            Some(_) => store.pending_by_owner().map_err(|e| std::io::Error::other(e.to_string()))?,
            None => HashMap::new(),
        };
        let pools: Vec<(Arc<dyn Runner>, usize)> = kinds.iter().map(|k| (k.runner.clone(), k.workers)).collect();
        let workers_log: Vec<String> = pools.iter().map(|(r, n)| format!("{}={n}", r.name())).collect();
        let dispatcher = start_dispatcher(&settings, &io, metrics.clone(), store.clone(), hub.clone(), owners, pools);
        let policy = CallbackPolicy { allow_private: settings.webhooks.allow_private_webhooks };
        let analytics_limits = routes::AnalyticsLimits {
            max_batch: settings.analytics.analytics_max_batch.max(1),
            max_properties: settings.analytics.analytics_max_properties.bytes(),
        };
        let analytics = io.analytics.clone();
        let registry = web::Data::new(crate::kind::Kinds::new(kinds.iter().map(|k| k.runner.clone()).collect()));
        let kinds_http: Arc<Vec<routes::KindRoutes>> = Arc::new(kinds.into_iter().map(|k| k.http).collect());
        let spec = web::Data::new(routes::openapi::Spec::build(kinds_http.iter().map(|k| k.openapi.clone())));
        let ws = WsSettings {
            heartbeat: settings.ws.ws_heartbeat.into(),
            idle_timeout: settings.ws.ws_idle_timeout.into(),
            max_frame: settings.ws.ws_max_frame.bytes(),
            max_subscriptions: settings.ws.ws_max_subscriptions,
            allowed_origins: settings.ws.ws_allowed_origins.clone(),
            send_timeout: Duration::from_secs(10),
        };
        let json_limit = settings.server.max_json_body.bytes();
        let body_timeout = routes::BodyTimeout(settings.server.body_timeout());
        let body_budget = routes::BodyBudget::new(
            settings.server.max_body_memory.bytes(),
            json_limit,
            settings.images.max_upload.bytes(),
        );
        let static_dir = settings.server.static_dir.clone();
        let app_dispatcher = dispatcher.clone();
        let server = HttpServer::new(move || {
            // Runs once on each HTTP worker thread as it starts.
            crate::process::name_thread(c"http-worker");
            App::new()
                .wrap(routes::json_errors())
                // The path without its query: `/ws?access_token=` carries an API key.
                .wrap(
                    middleware::Logger::new("%{request}xi %s %b %Dms")
                        .custom_request_replace("request", |req| format!("{} {}", req.method(), req.path()))
                        .log_target("offload::http"),
                )
                .wrap(middleware::from_fn(routes::body_deadline))
                .wrap(middleware::from_fn(metrics::middleware::record))
                .app_data(web::Data::new(body_timeout))
                .app_data(web::Data::new(body_budget.clone()))
                .app_data(web::Data::new(access.clone()))
                .app_data(web::Data::new(signing.clone()))
                .app_data(web::Data::new(app_dispatcher.clone()))
                .app_data(web::Data::new(store.clone()))
                .app_data(web::Data::new(hub.clone()))
                .app_data(web::Data::new(metrics.clone()))
                .app_data(web::Data::new(analytics.clone()))
                .app_data(web::Data::new(analytics_limits))
                .app_data(web::Data::new(policy))
                .app_data(web::Data::new(ws.clone()))
                .app_data(spec.clone())
                .app_data(registry.clone())
                .configure(|cfg| routes::configure(cfg, json_limit, static_dir.as_deref(), &kinds_http))
        })
        .workers(settings.server.http_workers())
        .tcp_nodelay(true)
        .disable_signals()
        .shutdown_timeout(10)
        .listen(listener)?
        .run();
        tracing::info!(
            workers = workers_log.join(" "),
            http_workers = settings.server.http_workers(),
            "listening on http://{address}"
        );
        Ok(Application {
            port: address.port(),
            server,
            dispatcher,
            store: app_store,
            grace: settings.workers.shutdown_grace(),
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Serves until SIGTERM/SIGINT, then drains (see [`shutdown`]) and returns.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        actix_rt::spawn(shutdown::on_signal(self.dispatcher, self.store, self.server.handle(), self.grace));
        self.server.await
    }
}

/// The webhook secrets: `--webhook-secret`, and the explicit ones of `--webhook-secrets`.
fn webhook_signing(settings: &Settings, keys: Option<&ApiKeys>) -> std::io::Result<Signing> {
    let service = settings.webhooks.webhook_secret.clone().filter(|s| !s.is_empty());
    let explicit = match (&settings.webhooks.webhook_secrets, keys) {
        (None, _) => KeySecrets::default(),
        (Some(_), None) => return Err(std::io::Error::other("--webhook-secrets needs --api-keys")),
        (Some(raw), Some(keys)) => KeySecrets::from_arg(raw.expose(), keys)
            .map_err(|e| std::io::Error::other(format!("--webhook-secrets: {e}")))?,
    };
    if !explicit.is_empty() {
        tracing::info!(keys = explicit.len(), "webhooks of these API keys are signed with their own explicit secrets");
    }
    Ok(Signing { service, keys: Arc::new(explicit) })
}

/// The store `--store` names. The embedded one refuses to open a data directory in use.
fn open_store(settings: &StoreSettings, metrics: Arc<Metrics>) -> std::io::Result<Arc<dyn JobStore>> {
    Ok(match settings.store {
        StoreKind::Memory => Arc::new(MemoryStore::new(Retention {
            ttl: settings.result_ttl(),
            result_bytes: settings.result_memory.bytes(),
            finished_jobs: settings.max_finished_jobs,
        })),
        StoreKind::Postgres => {
            let url = settings.database_url().ok_or_else(|| {
                std::io::Error::other("--store postgres needs --database-url (or OFFLOAD_DATABASE_URL, DATABASE_URL)")
            })?;
            let options = crate::store::PgOptions {
                url,
                lease: settings.lease.into(),
                max_attempts: settings.max_attempts,
                ttl: settings.result_ttl(),
                connections: settings.db_connections.into(),
                result_budget: settings.result_disk.bytes(),
            };
            Arc::new(crate::store::PgStore::open(&options).map_err(std::io::Error::other)?)
        }
        StoreKind::Sqlite => {
            let options = SqliteOptions {
                dir: settings.data_dir.clone(),
                sync: settings.sync,
                max_attempts: settings.max_attempts,
                ttl: settings.result_ttl(),
                result_bytes: settings.result_disk.bytes(),
            };
            Arc::new(SqliteStore::open(&options, metrics).map_err(std::io::Error::other)?)
        }
    })
}

/// A kind as start-up registers it: its runner, its pool here, and its HTTP routes.
pub struct KindRegistration {
    pub runner: Arc<dyn Runner>,
    /// Threads of its pool on this instance (0: none; another instance on a shared store runs it).
    pub workers: usize,
    pub http: routes::KindRoutes,
}

impl KindRegistration {
    /// A kind submitted with `POST /jobs` only (no routes of its own), with `workers` threads.
    pub fn json_only(runner: Arc<dyn Runner>, workers: usize) -> Self {
        KindRegistration { runner, workers, http: routes::KindRoutes::none() }
    }
}

/// The kinds offload runs out of the box, set up from `settings`.
pub fn builtin_kinds(settings: &Settings) -> Vec<KindRegistration> {
    let (max_pages, max_lines) = settings.pdf.render_budget();
    let limits = SpecLimits {
        max_rows: settings.pdf.max_rows,
        max_columns: settings.pdf.max_columns,
        max_cell_chars: settings.pdf.max_cell_chars,
        render: RenderBudget { max_pages, max_lines },
    };
    let pdf = Arc::new(PdfKind { limits });
    let image = Arc::new(ImageKind);
    let uploads = UploadLimits {
        max_bytes: settings.images.max_upload.bytes(),
        timeout: settings.server.body_timeout(),
        max_files: settings.images.max_files,
        image: ImageLimits { max_pixels: settings.images.max_pixels, max_jpeg_scans: settings.images.max_jpeg_scans },
    };
    vec![
        KindRegistration {
            runner: pdf.clone(),
            workers: settings.pdf_workers(),
            http: crate::kinds::pdf::routes::http(pdf),
        },
        KindRegistration {
            runner: image.clone(),
            workers: settings.image_workers(),
            http: crate::kinds::image::routes::http(image, uploads),
        },
    ]
}

/// A pool thread's name: `<kind>-worker`, cut to the 15 bytes Linux keeps.
fn thread_name(kind: &str) -> std::ffi::CString {
    let mut name = format!("{kind}-worker");
    name.truncate(15);
    std::ffi::CString::new(name).expect("kind names have no NUL")
}

fn start_dispatcher(
    settings: &Settings,
    io: &AsyncIo,
    metrics: Arc<Metrics>,
    store: Arc<dyn JobStore>,
    hub: Arc<Hub>,
    owners: HashMap<Owner, usize>,
    kinds: Vec<(Arc<dyn Runner>, usize)>,
) -> Addr<Dispatcher> {
    let (nice, sched) = (settings.workers.worker_nice, settings.workers.worker_sched);
    let hook = store.start_hook();
    // A kind with no workers here has no pool: another instance on the shared store runs it.
    let mut pools = HashMap::new();
    for (runner, workers) in kinds.into_iter().filter(|(_, n)| *n > 0) {
        let kind = JobKind::named(runner.name()).expect("checked at start");
        let thread = thread_name(kind.as_str());
        let on_start = hook.clone();
        let pool = SyncArbiter::start(workers, move || {
            JobWorker::on_pool_thread(&thread, nice, sched, on_start.clone(), runner.clone())
        });
        pools.insert(kind, Pool::new(pool.recipient(), workers));
    }
    let admission = Admission {
        max_pending: settings.admission.max_pending,
        max_pending_per_key: settings.admission.max_pending_per_key.map(|n| n as usize),
        max_queued_bytes: settings.admission.max_queued_bytes.bytes(),
        job_timeout: settings.workers.job_timeout(),
    };
    let ttl = settings.store.result_ttl();
    let observers =
        Observers { metrics, analytics: io.analytics.clone(), webhooks: io.webhooks.clone().recipient(), hub };
    // Its own thread and event loop: job bookkeeping never competes with HTTP workers.
    let arbiter = Arbiter::new();
    arbiter.spawn_fn(|| crate::process::name_thread(c"dispatcher"));
    Dispatcher::start_in_arbiter(&arbiter.handle(), move |_| {
        Dispatcher::new(store, pools, admission, ttl, observers, owners)
    })
}
