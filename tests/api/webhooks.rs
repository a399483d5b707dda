//! Webhooks: the final job object POSTed to `callback_url`, signed, retried; private targets
//! refused at submit (literal addresses) and at delivery (names).

use std::time::Duration;

use awc::http::StatusCode;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

use crate::helpers::{duration, id_of, report, settings, spawn_app_with, Behaviour, Part, Receiver};

fn webhook_settings() -> offload::configuration::Settings {
    let mut s = settings();
    s.webhooks.allow_private_webhooks = true;
    s.webhooks.webhook_backoff = duration(Duration::from_millis(50));
    s
}

fn hmac_hex(key: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes()).unwrap();
    mac.update(body);
    mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

fn with_callback(mut spec: Value, url: &str) -> Value {
    spec["callback_url"] = json!(url);
    spec
}

#[actix_rt::test]
async fn the_final_job_object_is_posted_once_and_signed() {
    let receiver = Receiver::start(Behaviour::default()).await;
    let mut s = webhook_settings();
    s.webhooks.webhook_secret = Some("s3cret-key".into());
    let app = spawn_app_with(s).await;
    let hook = format!("{}/hooks/offload?token=abc", receiver.url);
    let ok = app.submit_pdf(&with_callback(report(5), &hook)).await;
    assert!(ok.get("callback_url").is_none(), "the URL (it may hold a token) is not echoed");
    let failing = app.submit_pdf(&with_callback(json!({"title": "x", "test_hook": "panic"}), &hook)).await;
    let image = app
        .submit_images(&[
            Part::file("a.png", "image/png", crate::images::png(64, 48)),
            Part::text("callback_url", &hook),
        ])
        .await;
    let ids = [id_of(&ok), id_of(&failing), id_of(&image[0])];
    let requests = receiver.wait_until(Duration::from_secs(15), |r| r.len() >= 3).await;
    for r in &requests {
        let body = r.json();
        let id = body["id"].as_str().unwrap();
        assert!(ids.contains(&id), "{body}");
        assert_eq!(r.header("x-offload-job-id").as_deref(), Some(id));
        assert_eq!(r.header("content-type").as_deref(), Some("application/json"));
        assert_eq!(r.header("x-offload-attempt").as_deref(), Some("1"));
        let expected = format!("sha256={}", hmac_hex("s3cret-key", &r.body));
        assert_eq!(r.header("x-offload-signature"), Some(expected), "signature of the exact body");
        assert_eq!(body, app.job(id).await, "the body is the final job object");
    }
    let by_id = |id: &str| requests.iter().map(|r| r.json()).find(|b| b["id"] == id).unwrap();
    assert_eq!(by_id(ids[0])["status"], "succeeded");
    assert_eq!(by_id(ids[0])["progress"], 1.0);
    assert_eq!(by_id(ids[1])["status"], "failed");
    assert_eq!(by_id(ids[1])["error"]["code"], "worker_panic");
    assert_eq!(by_id(ids[2])["result"]["width"], 64);
    let m = app
        .wait_metrics(Duration::from_secs(5), |m| {
            m.value("offload_webhook_deliveries_total", &[("outcome", "delivered")]) == 3.0
        })
        .await;
    assert_eq!(m.value("offload_webhook_attempt_failures_total", &[("reason", "status")]), 0.0);
    assert_eq!(receiver.requests().len(), 3, "exactly one POST per job");
}

#[actix_rt::test]
async fn failed_deliveries_are_retried_with_growing_delays() {
    let receiver = Receiver::start(Behaviour { fail_first: 2, fail_status: 503, ..Default::default() }).await;
    let app = spawn_app_with(webhook_settings()).await;
    let job = app.submit_pdf(&with_callback(report(1), &receiver.url)).await;
    let requests = receiver.wait_until(Duration::from_secs(10), |r| r.iter().any(|x| x.status == 200)).await;
    assert_eq!(requests.iter().map(|r| r.status).collect::<Vec<_>>(), [503, 503, 200]);
    let attempts: Vec<String> = requests.iter().map(|r| r.header("x-offload-attempt").unwrap()).collect();
    assert_eq!(attempts, ["1", "2", "3"]);
    assert!(requests.iter().all(|r| r.body == requests[0].body), "every attempt sends the same bytes");
    assert_eq!(requests[0].json()["id"], id_of(&job));
    // Backoff 50 ms then 100 ms, each ±20 %.
    let first_gap = requests[1].at - requests[0].at;
    let second_gap = requests[2].at - requests[1].at;
    assert!(first_gap >= Duration::from_millis(40), "{first_gap:?}");
    assert!(second_gap >= Duration::from_millis(80), "{second_gap:?}");
    let m = app
        .wait_metrics(Duration::from_secs(5), |m| {
            m.value("offload_webhook_deliveries_total", &[("outcome", "delivered")]) == 1.0
        })
        .await;
    assert_eq!(m.value("offload_webhook_attempt_failures_total", &[("reason", "status")]), 2.0);
}

#[actix_rt::test]
async fn delivery_gives_up_after_the_last_attempt() {
    let receiver = Receiver::start(Behaviour { always_fail: true, fail_status: 500, ..Default::default() }).await;
    let mut s = webhook_settings();
    s.webhooks.webhook_max_attempts = 3;
    s.webhooks.webhook_backoff = duration(Duration::from_millis(10));
    let app = spawn_app_with(s).await;
    app.submit_pdf(&with_callback(report(1), &receiver.url)).await;
    app.wait_metrics(Duration::from_secs(10), |m| {
        m.value("offload_webhook_deliveries_total", &[("outcome", "failed")]) == 1.0
    })
    .await;
    assert_eq!(receiver.requests().len(), 3, "exactly max attempts");
    // A receiver that refuses for good (4xx) is not retried.
    let gone = Receiver::start(Behaviour { always_fail: true, fail_status: 410, ..Default::default() }).await;
    app.submit_pdf(&with_callback(report(1), &gone.url)).await;
    app.wait_metrics(Duration::from_secs(10), |m| {
        m.value("offload_webhook_deliveries_total", &[("outcome", "failed")]) == 2.0
    })
    .await;
    assert_eq!(gone.requests().len(), 1);
}

#[actix_rt::test]
async fn private_and_malformed_callbacks_are_refused_at_submit() {
    let app = spawn_app_with(settings()).await;
    let cases = [
        ("http://127.0.0.1:9/hook", "callback_not_allowed"),
        ("http://[::1]:9/", "callback_not_allowed"),
        ("http://10.0.0.7/", "callback_not_allowed"),
        ("http://192.168.1.20/", "callback_not_allowed"),
        ("http://169.254.169.254/latest/meta-data/", "callback_not_allowed"),
        ("http://0x7f.1/", "callback_not_allowed"),
        ("http://[::ffff:127.0.0.1]/", "callback_not_allowed"),
        ("http://[::ffff:0:7f00:1]/", "callback_not_allowed"),
        ("http://[64:ff9b:1::7f00:1]/", "callback_not_allowed"),
        ("http://[2002:7f00:1::1]/", "callback_not_allowed"),
        ("ftp://example.com/", "invalid_callback_url"),
        ("not a url", "invalid_callback_url"),
        ("/relative/path", "invalid_callback_url"),
    ];
    for (url, code) in cases {
        let reply = app.post_json("/generate-pdf", &with_callback(report(1), url)).await;
        let message = reply.expect_error(422, code, url);
        assert!(message.starts_with("callback_url"), "{url}: {message}");
    }
    let reply = app.post_json("/generate-pdf", &json!({"title": "t", "callback_url": 5})).await;
    reply.expect_error(422, "invalid_field", "numeric callback_url");
    let reply = app
        .upload(&[
            Part::file("a.png", "image/png", crate::images::png(8, 8)),
            Part::text("callback_url", "http://127.0.0.1:9/"),
        ])
        .await;
    reply.expect_error(422, "callback_not_allowed", "image upload");
    let jobs = app.get("/jobs").await.json();
    assert_eq!(jobs["jobs"].as_array().unwrap().len(), 0, "no job was created");
}

#[actix_rt::test]
async fn an_ipv6_literal_callback_is_delivered() {
    // The URL's host is `[::1]`: a literal address, not a name to resolve.
    let receiver = Receiver::start_on("[::1]:0", Behaviour::default()).await;
    let app = spawn_app_with(webhook_settings()).await;
    let url = format!("{}/hook", receiver.url);
    assert!(url.starts_with("http://[::1]:"), "{url}");
    let job = app.submit_pdf(&with_callback(report(1), &url)).await;
    let requests = receiver.wait_until(Duration::from_secs(10), |r| !r.is_empty()).await;
    assert_eq!(requests[0].json()["id"], id_of(&job));
}

#[actix_rt::test]
async fn names_that_resolve_to_private_addresses_are_refused_at_delivery() {
    let receiver = Receiver::start(Behaviour::default()).await;
    let app = spawn_app_with(settings()).await;
    // `localhost` is a name: it passes at submit and is refused once resolved.
    let url = format!("http://localhost:{}/hook", receiver.port);
    let job = app.submit_pdf(&with_callback(report(1), &url)).await;
    app.wait_finished(id_of(&job)).await;
    let m = app
        .wait_metrics(Duration::from_secs(10), |m| {
            m.value("offload_webhook_deliveries_total", &[("outcome", "refused")]) == 1.0
        })
        .await;
    assert_eq!(m.value("offload_webhook_deliveries_total", &[("outcome", "delivered")]), 0.0);
    assert!(receiver.requests().is_empty(), "nothing reached the private address");

    // With the operator's permission the same name is delivered to.
    let mut s = settings();
    s.webhooks.allow_private_webhooks = true;
    let allowed = spawn_app_with(s).await;
    let job = allowed.submit_pdf(&with_callback(report(1), &url)).await;
    let requests = receiver.wait_until(Duration::from_secs(10), |r| !r.is_empty()).await;
    assert_eq!(requests[0].json()["id"], id_of(&job));
    assert_eq!(requests[0].header("x-offload-signature"), None, "unsigned without a secret");
    assert_eq!(StatusCode::from_u16(requests[0].status).unwrap(), StatusCode::OK);
}

/// The per-key secret as the README spells it: hex of HMAC-SHA256(S, "offload-webhook-v1:" +
/// owner), the owner being the hex of the first 16 bytes of SHA-256(key).
fn derived_secret(service: &str, api_key: &str) -> String {
    use sha2::Digest;
    let digest = Sha256::digest(api_key.as_bytes());
    let owner: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    hmac_hex(service, format!("offload-webhook-v1:{owner}").as_bytes())
}

const SERVICE_SECRET: &str = "service-secret-0123456789";

#[actix_rt::test]
async fn each_api_key_s_webhooks_are_signed_with_its_own_secret() {
    use crate::keys::{as_key, KEY_A, KEY_B};
    let receiver = Receiver::start(Behaviour::default()).await;
    let mut s = webhook_settings();
    s.webhooks.webhook_secret = Some(SERVICE_SECRET.into());
    s.access.api_keys = Some(format!("{KEY_A},{KEY_B}").parse().unwrap());
    let app = spawn_app_with(s).await;
    let (a, b) = (as_key(&app, KEY_A), as_key(&app, KEY_B));
    let secret_of = |reply: crate::helpers::Reply| {
        assert_eq!(reply.status, 200, "{}", String::from_utf8_lossy(&reply.body));
        assert_eq!(reply.header("cache-control").as_deref(), Some("no-store"));
        reply.json()["secret"].as_str().expect("secret").to_string()
    };
    let secret_a = secret_of(a.get("/webhook-secret").await);
    let secret_b = secret_of(b.get("/webhook-secret").await);
    assert_ne!(secret_a, secret_b);
    assert_eq!(secret_a, derived_secret(SERVICE_SECRET, KEY_A), "the documented derivation");
    assert_eq!(secret_b, derived_secret(SERVICE_SECRET, KEY_B));
    assert!(!secret_a.contains(SERVICE_SECRET) && secret_a.len() == 64, "{secret_a}");

    let job_a = a.submit_pdf(&with_callback(report(1), &format!("{}/a", receiver.url))).await;
    let job_b = b.submit_pdf(&with_callback(report(1), &format!("{}/b", receiver.url))).await;
    let requests = receiver.wait_until(Duration::from_secs(15), |r| r.len() >= 2).await;
    let signed = |id: &str| {
        let r = requests.iter().find(|r| r.json()["id"] == id).unwrap_or_else(|| panic!("no webhook for {id}"));
        (r.header("x-offload-signature").expect("signed"), r.body.clone())
    };
    let (sig_a, body_a) = signed(id_of(&job_a));
    let (sig_b, body_b) = signed(id_of(&job_b));
    // (signature, body, key, verifies)
    let cases = [
        (&sig_a, &body_a, secret_a.as_str(), true),
        (&sig_a, &body_a, secret_b.as_str(), false),
        (&sig_a, &body_a, SERVICE_SECRET, false),
        (&sig_b, &body_b, secret_b.as_str(), true),
        (&sig_b, &body_b, secret_a.as_str(), false),
        (&sig_b, &body_b, SERVICE_SECRET, false),
    ];
    for (i, (sig, body, key, verifies)) in cases.into_iter().enumerate() {
        let expected = format!("sha256={}", hmac_hex(key, body));
        assert_eq!(*sig == expected, verifies, "case {i}: {sig} with key {key}");
    }
}

#[actix_rt::test]
async fn the_webhook_secret_route_serves_no_secret_without_keys_or_without_a_service_secret() {
    use crate::keys::{as_key, KEY_A};
    // (API keys, --webhook-secret, error code)
    let cases = [
        (true, None, "webhook_secret_not_set"),
        (false, Some(SERVICE_SECRET), "no_api_keys"),
        (false, None, "no_api_keys"),
    ];
    for (keys, secret, code) in cases {
        let mut s = webhook_settings();
        s.webhooks.webhook_secret = secret.map(str::to_string);
        if keys {
            s.access.api_keys = Some(KEY_A.parse().unwrap());
        }
        let app = as_key(&spawn_app_with(s).await, KEY_A);
        let reply = app.get("/webhook-secret").await;
        let message = reply.expect_error(404, code, &format!("keys {keys}, secret {secret:?}"));
        assert!(!message.contains(SERVICE_SECRET), "{message}");
        assert!(!String::from_utf8_lossy(&reply.body).contains(SERVICE_SECRET));
    }
}

#[actix_rt::test]
async fn a_webhook_owed_across_a_restart_is_signed_with_its_key_s_secret() {
    use crate::keys::{as_key, KEY_A};
    // The first delivery fails and the next attempt is an hour away: still owed at the kill.
    let receiver = Receiver::start(Behaviour { always_fail: true, fail_status: 503, ..Default::default() }).await;
    let dir = crate::helpers::fresh_data_dir();
    let args = [
        format!("--api-keys={KEY_A}"),
        format!("--webhook-secret={SERVICE_SECRET}"),
        "--allow-private-webhooks".to_string(),
        "--webhook-backoff=1h".to_string(),
        "--result-ttl=1h".to_string(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut first = crate::process::start(&dir, &args);
    let a = as_key(&first.app, KEY_A);
    let job = a.submit_pdf(&with_callback(report(1), &receiver.url)).await;
    receiver.wait_until(Duration::from_secs(15), |r| !r.is_empty()).await;
    first.kill9();

    receiver.set_behaviour(Behaviour::default());
    let _second = crate::process::start(&dir, &args);
    let requests = receiver.wait_until(Duration::from_secs(15), |r| r.iter().any(|x| x.status == 200)).await;
    let delivered = requests.iter().find(|r| r.status == 200).unwrap();
    assert_eq!(delivered.json()["id"], id_of(&job));
    let expected = format!("sha256={}", hmac_hex(&derived_secret(SERVICE_SECRET, KEY_A), &delivered.body));
    assert_eq!(delivered.header("x-offload-signature"), Some(expected), "re-delivered with A's secret, not S");
}

#[actix_rt::test]
async fn a_key_with_an_explicit_secret_is_signed_with_it_and_the_others_keep_the_derived_one() {
    use crate::keys::{as_key, KEY_A, KEY_B};
    let receiver = Receiver::start(Behaviour::default()).await;
    let file = crate::helpers::fresh_data_dir().join("webhook-secrets");
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::write(&file, format!("# tenant A chose its own\n{KEY_A} explicit-secret-of-a-01234\n")).unwrap();
    let mut s = webhook_settings();
    s.webhooks.webhook_secret = Some(SERVICE_SECRET.into());
    s.webhooks.webhook_secrets = Some(format!("@{}", file.display()).parse().unwrap());
    s.access.api_keys = Some(format!("{KEY_A},{KEY_B}").parse().unwrap());
    let app = spawn_app_with(s).await;
    let (a, b) = (as_key(&app, KEY_A), as_key(&app, KEY_B));
    assert_eq!(a.get("/webhook-secret").await.json()["secret"], "explicit-secret-of-a-01234");
    assert_eq!(b.get("/webhook-secret").await.json()["secret"], derived_secret(SERVICE_SECRET, KEY_B));
    let job_a = a.submit_pdf(&with_callback(report(1), &receiver.url)).await;
    let job_b = b.submit_pdf(&with_callback(report(1), &receiver.url)).await;
    let requests = receiver.wait_until(Duration::from_secs(15), |r| r.len() >= 2).await;
    // (job, the key its signature must verify with)
    let cases = [
        (id_of(&job_a), "explicit-secret-of-a-01234".to_string()),
        (id_of(&job_b), derived_secret(SERVICE_SECRET, KEY_B)),
    ];
    for (id, key) in cases {
        let r = requests.iter().find(|r| r.json()["id"] == id).expect("delivered");
        let expected = format!("sha256={}", hmac_hex(&key, &r.body));
        assert_eq!(r.header("x-offload-signature"), Some(expected), "{id}");
    }
}
