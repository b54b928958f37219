//! The console's HTTP routes. Every page has its JSON twin under `/api/` (same handler, same
//! value); a page asked with the `X-Console-Live` header gets its live part alone, which the
//! page's script swaps in every few seconds. State changes are POSTs checked for the CSRF
//! token and the origin, done with the SDK's own confirmed moves, then redirect back.

use std::collections::HashSet;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use minijinja::context;
use serde::{Deserialize, Serialize};
use warren_common::JobId;
use warren_producer::{schedules, DlqFilter, ReplayOptions};

use super::views::{self, JobSearch};
use super::Console;

/// The header the live-update script sends to get a page's live part.
const LIVE_HEADER: &str = "x-console-live";

pub(crate) fn router(console: Arc<Console>) -> Router {
    Router::new()
        .route("/", get(overview))
        .route("/api/overview", get(overview))
        .route("/tenants", get(tenants))
        .route("/api/tenants", get(tenants))
        .route("/jobs", get(jobs))
        .route("/api/jobs", get(jobs))
        .route("/jobs/{id}", get(job))
        .route("/api/jobs/{id}", get(job))
        .route("/failures", get(failures))
        .route("/api/failures", get(failures))
        .route("/schedules", get(schedules_page))
        .route("/api/schedules", get(schedules_page))
        .route("/api/health", get(health))
        .route("/static/console.js", get(script))
        .route("/static/console.css", get(style))
        .route("/failures/replay", post(replay))
        .route("/failures/purge", post(purge))
        .route("/schedules/{name}/{action}", post(schedule_action))
        .layer(middleware::from_fn_with_state(console.clone(), guard))
        .with_state(console)
}

/// Credentials first, for every route.
async fn guard(State(console): State<Arc<Console>>, request: Request, next: Next) -> Response {
    if !console.credentials.admits(request.headers()) {
        return console.credentials.challenge().into_response();
    }
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    // The console is never framed (clickjacking of its buttons) and scripts come from itself.
    headers.insert(
        header::X_FRAME_OPTIONS,
        header::HeaderValue::from_static("DENY"),
    );
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        header::HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self'; frame-ancestors 'none'",
        ),
    );
    response
}

/// A message shown once after a POST.
#[derive(Debug, Default, Deserialize)]
struct Flash {
    #[serde(default)]
    done: Option<String>,
    #[serde(default)]
    problem: Option<String>,
}

/// What every page's answer depends on besides its data: the URL (a page, or its JSON under
/// `/api/`), whether the live part alone is asked, and the flash message.
struct Asked {
    uri: Uri,
    live: bool,
    flash: Flash,
}

impl<S: Send + Sync> FromRequestParts<S> for Asked {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let flash = Query::<Flash>::from_request_parts(parts, state)
            .await
            .map_or_else(|_| Flash::default(), |Query(flash)| flash);
        Ok(Self {
            uri: parts.uri.clone(),
            live: parts.headers.contains_key(LIVE_HEADER),
            flash,
        })
    }
}

/// The page `template` of `value`, its live part, or its JSON.
fn respond<T: Serialize>(console: &Console, asked: &Asked, template: &str, value: T) -> Response {
    let health = console.health();
    if asked.uri.path().starts_with("/api/") {
        return Json(serde_json::json!({ "health": health, "page": value })).into_response();
    }
    let nav = match template {
        "overview.html" => "Overview",
        "tenants.html" => "Tenants",
        "jobs.html" | "job.html" => "Jobs",
        "failures.html" => "Failures",
        _ => "Schedules",
    };
    let context = context! {
        page => value,
        nav => nav,
        health => health,
        csrf => console.csrf.token(),
        here => back_here(&asked.uri),
        done => asked.flash.done,
        problem => asked.flash.problem,
    };
    let rendered = console
        .templates
        .get_template(template)
        .and_then(|t| match asked.live {
            true => t
                .render_captured(context)?
                .with_state_mut(|state| state.render_block("live")),
            false => t.render(context),
        });
    match rendered {
        Ok(html) => Html(html).into_response(),
        Err(e) => {
            tracing::error!(error = %e, template, "A console page did not render.");
            (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")).into_response()
        }
    }
}

/// This page's URL without its flash message: where a form on it comes back to.
fn back_here(uri: &Uri) -> String {
    let query = uri.query().unwrap_or("");
    let kept: String = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(
            form_urlencoded::parse(query.as_bytes()).filter(|(k, _)| k != "done" && k != "problem"),
        )
        .finish();
    match kept.is_empty() {
        true => uri.path().to_string(),
        false => format!("{}?{kept}", uri.path()),
    }
}

async fn overview(State(console): State<Arc<Console>>, asked: Asked) -> Response {
    let hot = console.client.hot_tenants();
    let view = console.view(|jobs, reading| views::overview(jobs, reading, hot));
    respond(&console, &asked, "overview.html", view)
}

async fn tenants(State(console): State<Arc<Console>>, asked: Asked) -> Response {
    let view = console.view(views::tenants);
    respond(&console, &asked, "tenants.html", view)
}

async fn jobs(
    State(console): State<Arc<Console>>,
    asked: Asked,
    Query(search): Query<JobSearch>,
) -> Response {
    let view = console.view(|jobs, _| views::job_list(jobs, search));
    respond(&console, &asked, "jobs.html", view)
}

async fn job(
    State(console): State<Arc<Console>>,
    asked: Asked,
    Path(id): Path<String>,
) -> Response {
    let Ok(id) = id.parse::<JobId>() else {
        return (StatusCode::NOT_FOUND, "not a job id").into_response();
    };
    let Some(mut page) = console.view(|jobs, _| views::job_page(jobs, id)) else {
        let why =
            "no such job in the history (unknown id, older than the retention, or not read yet)";
        return (StatusCode::NOT_FOUND, why).into_response();
    };
    if page.job.status == warren_common::history::Status::Succeeded {
        page.output = console.output(id).await;
        page.output_text = page
            .output
            .as_ref()
            .and_then(|o| serde_json::to_string_pretty(o).ok());
    }
    respond(&console, &asked, "job.html", page)
}

async fn failures(
    State(console): State<Arc<Console>>,
    asked: Asked,
    Query(search): Query<JobSearch>,
) -> Response {
    let view = console.view(|jobs, reading| views::failures(jobs, search, reading));
    respond(&console, &asked, "failures.html", view)
}

async fn schedules_page(State(console): State<Arc<Console>>, asked: Asked) -> Response {
    let schedules = console.view(|_, reading| reading.schedules.clone());
    respond(
        &console,
        &asked,
        "schedules.html",
        views::Schedules { schedules },
    )
}

async fn health(State(console): State<Arc<Console>>) -> Response {
    Json(console.health()).into_response()
}

async fn script() -> Response {
    let js = include_str!("static/console.js");
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        js,
    )
        .into_response()
}

async fn style() -> Response {
    let css = include_str!("static/console.css");
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], css).into_response()
}

// === POST ===

/// A POSTed form: its fields in order (`id` may repeat).
struct Form(Vec<(String, String)>);

impl Form {
    fn parse(body: &[u8]) -> Self {
        Self(form_urlencoded::parse(body).into_owned().collect())
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    }

    fn all(&self, key: &str) -> HashSet<String> {
        self.0
            .iter()
            .filter(|(k, v)| k == key && !v.is_empty())
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Where to go back to: a path of this console, never another site.
    fn back(&self, default: &str) -> String {
        match self.get("back") {
            Some(back) if back.starts_with('/') && !back.starts_with("//") => back.to_string(),
            _ => default.to_string(),
        }
    }
}

/// `back` with a flash message.
fn redirect(back: &str, key: &str, message: &str) -> Response {
    let sep = if back.contains('?') { '&' } else { '?' };
    let message: String = form_urlencoded::byte_serialize(message.as_bytes()).collect();
    Redirect::to(&format!("{back}{sep}{key}={message}")).into_response()
}

/// Checks the CSRF token and origin; the form when they hold.
fn checked(console: &Console, headers: &HeaderMap, body: &[u8]) -> Result<Form, &'static str> {
    let form = Form::parse(body);
    console.csrf.check(headers, form.get("csrf"))?;
    Ok(form)
}

fn refused(why: &'static str) -> Response {
    (StatusCode::FORBIDDEN, why).into_response()
}

/// The dead letters a replay or purge form selects: the ticked ids, or every job listed by
/// the failures search it carries (`all`).
fn selection(console: &Console, form: &Form) -> HashSet<String> {
    if form.get("all").is_none() {
        return form.all("id");
    }
    let search = JobSearch {
        tenant: form.get("tenant").unwrap_or("").into(),
        pipeline: form.get("pipeline").unwrap_or("").into(),
        step: form.get("step").unwrap_or("").into(),
        error: form.get("error").unwrap_or("").into(),
        since: form.get("since").unwrap_or("").into(),
        status: "dead_lettered".into(),
        ..JobSearch::default()
    };
    console
        .view(|jobs, reading| views::failures(jobs, search, reading))
        .list
        .jobs
        .iter()
        .map(|row| row.job_id.to_string())
        .collect()
}

async fn replay(State(console): State<Arc<Console>>, headers: HeaderMap, body: Bytes) -> Response {
    let form = match checked(&console, &headers, &body) {
        Ok(form) => form,
        Err(why) => return refused(why),
    };
    let back = form.back("/failures");
    let ids = selection(&console, &form);
    if ids.is_empty() {
        return redirect(&back, "problem", "nothing selected");
    }
    let filter = DlqFilter {
        ids: Some(ids),
        ..DlqFilter::default()
    };
    match console
        .client
        .dlq_replay(&filter, ReplayOptions::default())
        .await
    {
        Ok(report) => {
            let mut message = format!("replayed {}", report.replayed.len());
            for skipped in &report.skipped {
                message.push_str(&format!("; {} skipped: {}", skipped.letter.id, skipped.why));
            }
            if report.replayed.is_empty() && report.skipped.is_empty() {
                message.push_str(" (not in the dead-letter queue)");
            }
            redirect(&back, "done", &message)
        }
        Err(e) => redirect(&back, "problem", &e.to_string()),
    }
}

async fn purge(State(console): State<Arc<Console>>, headers: HeaderMap, body: Bytes) -> Response {
    let form = match checked(&console, &headers, &body) {
        Ok(form) => form,
        Err(why) => return refused(why),
    };
    let back = form.back("/failures");
    if form.get("confirm") != Some("purge") {
        return redirect(
            &back,
            "problem",
            "type purge in the box to confirm the purge",
        );
    }
    let ids = selection(&console, &form);
    if ids.is_empty() {
        return redirect(&back, "problem", "nothing selected");
    }
    let filter = DlqFilter {
        ids: Some(ids),
        ..DlqFilter::default()
    };
    match console.client.dlq_purge(&filter).await {
        Ok(purged) => redirect(&back, "done", &format!("purged {}", purged.len())),
        Err(e) => redirect(&back, "problem", &e.to_string()),
    }
}

async fn schedule_action(
    State(console): State<Arc<Console>>,
    Path((name, action)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(why) = checked(&console, &headers, &body) {
        return refused(why);
    }
    let client = &console.client;
    let outcome = match action.as_str() {
        "pause" => schedules::pause(client, &name).await,
        "resume" => schedules::resume(client, &name).await,
        _ => return (StatusCode::NOT_FOUND, "pause or resume").into_response(),
    };
    match outcome {
        Ok(()) => {
            console.refresh_schedules().await;
            redirect("/schedules", "done", &format!("{action}d {name}"))
        }
        Err(e) => redirect("/schedules", "problem", &e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_way_back_drops_the_flash_and_stays_on_this_console() {
        let uri: Uri = "/failures?tenant=acme&done=replayed%201".parse().unwrap();
        assert_eq!(back_here(&uri), "/failures?tenant=acme");
        let uri: Uri = "/jobs/x?problem=no".parse().unwrap();
        assert_eq!(back_here(&uri), "/jobs/x");
        let form = |back: &str| Form(vec![("back".into(), back.into())]);
        assert_eq!(form("/jobs/1").back("/failures"), "/jobs/1");
        assert_eq!(form("//evil.example/x").back("/failures"), "/failures");
        assert_eq!(form("https://evil.example").back("/failures"), "/failures");
    }
}
