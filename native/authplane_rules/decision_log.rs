//! The decision log inside Envoy: an access logger (`decision_log`) that appends one compact record
//! per request to a process-global buffer, and a bootstrap extension (`decision_log`) that ships
//! the buffer to authplane in batches, as a gRPC unary call made with Envoy's HTTP callout through
//! a cluster of the bootstrap (the xDS cluster: same TLS and connection pool).
//!
//! Record: `time US request_id US route US status US details US sub US san (US name GS value)*`
//! (`time`: the request's start, ISO 8601 UTC with milliseconds),
//! records separated by RS. Batch payload: `v1 US node US fleet US dropped RS record (RS record)*`,
//! framed as one gRPC message (0x00, 4-byte big-endian length, payload).
//!
//! Worker threads only lock a mutex and copy bytes (no I/O); the shipping runs on the main thread
//! (a timer). Every hook runs under `catch_unwind`. Envoy's callbacks are looked up with `dlsym` when
//! a logger or extension is configured: a missing one refuses that configuration (never crashes).

use super::{resolve, Buf, ModuleHeader, Parser, J};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

const US: u8 = 0x1f;
const RS: u8 = 0x1e;
const GS: u8 = 0x1d;
const MAX_VALUE: usize = 1024;
const DEFAULT_MAX_BYTES: usize = 4 << 20;
const JWT_NS: &[u8] = b"envoy.filters.http.jwt_authn";
const JWT_SUB: &[u8] = b"jwt_payload.sub";
const RBAC_NS: &[u8] = b"envoy.filters.http.rbac";
const EXT_AUTHZ_NS: &[u8] = b"envoy.filters.http.ext_authz";

/// What the workers appended and the bootstrap extension has not taken yet.
struct Pending {
    bytes: Vec<u8>,
    records: u64,
}

static PENDING: Mutex<Pending> = Mutex::new(Pending { bytes: Vec::new(), records: 0 });
/// Records lost (buffer full, failed callouts) and not yet reported in a batch.
static DROPPED: AtomicU64 = AtomicU64::new(0);
static SENT_BATCHES: AtomicU64 = AtomicU64::new(0);
static SENT_RECORDS: AtomicU64 = AtomicU64::new(0);
static FAILED_BATCHES: AtomicU64 = AtomicU64::new(0);

fn pending() -> std::sync::MutexGuard<'static, Pending> {
    PENDING.lock().unwrap_or_else(|e| e.into_inner())
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// `v` cut to MAX_VALUE bytes (at a UTF-8 boundary), every byte < 0x20 as '?'.
fn push_value(out: &mut Vec<u8>, v: &[u8]) {
    let mut n = v.len().min(MAX_VALUE);
    if n < v.len() {
        while n > 0 && (v[n] & 0xC0) == 0x80 {
            n -= 1;
        }
    }
    out.extend(v[..n].iter().map(|&b| if b < 0x20 { b'?' } else { b }));
}

// ------------------------------------------------------------------------------------------------
// Envoy's callbacks (Envoy 1.40, dynamic modules ABI of source/extensions/dynamic_modules/abi/abi.h).

type Ptr = *mut c_void;

struct LogApi {
    request_id: unsafe extern "C" fn(Ptr, *mut Buf) -> bool,
    route_name: unsafe extern "C" fn(Ptr, *mut Buf) -> bool,
    response_code: unsafe extern "C" fn(Ptr) -> u32,
    response_code_details: unsafe extern "C" fn(Ptr, *mut Buf) -> bool,
    dynamic_metadata: unsafe extern "C" fn(Ptr, Buf, Buf, *mut Buf) -> bool,
    header_value: unsafe extern "C" fn(Ptr, i32, Buf, *mut Buf, usize, *mut usize) -> bool,
    uri_san_size: unsafe extern "C" fn(Ptr) -> usize,
    uri_san: unsafe extern "C" fn(Ptr, *mut Buf) -> bool,
    dns_san_size: unsafe extern "C" fn(Ptr) -> usize,
    dns_san: unsafe extern "C" fn(Ptr, *mut Buf) -> bool,
    timing_info: unsafe extern "C" fn(Ptr, *mut c_void),
}

struct BootApi {
    signal_init_complete: unsafe extern "C" fn(Ptr),
    timer_new: unsafe extern "C" fn(Ptr) -> Ptr,
    timer_enable: unsafe extern "C" fn(Ptr, u64),
    timer_delete: unsafe extern "C" fn(Ptr),
    http_callout: unsafe extern "C" fn(Ptr, *mut u64, Buf, *const ModuleHeader, usize, Buf, u64) -> i32,
}

static LOG_API: OnceLock<Result<LogApi, String>> = OnceLock::new();
static BOOT_API: OnceLock<Result<BootApi, String>> = OnceLock::new();

macro_rules! sym {
    ($name:literal) => {
        std::mem::transmute(resolve(concat!($name, "\0").as_bytes())?)
    };
}

unsafe fn load_log_api() -> Result<LogApi, String> {
    #[cfg(authplane_abi_probe)]
    resolve(b"envoy_dynamic_module_callback_from_a_later_abi\0")?;
    Ok(LogApi {
        request_id: sym!("envoy_dynamic_module_callback_access_logger_get_request_id"),
        route_name: sym!("envoy_dynamic_module_callback_access_logger_get_route_name"),
        response_code: sym!("envoy_dynamic_module_callback_access_logger_get_response_code"),
        response_code_details: sym!("envoy_dynamic_module_callback_access_logger_get_response_code_details"),
        dynamic_metadata: sym!("envoy_dynamic_module_callback_access_logger_get_dynamic_metadata"),
        header_value: sym!("envoy_dynamic_module_callback_access_logger_get_header_value"),
        uri_san_size: sym!("envoy_dynamic_module_callback_access_logger_get_downstream_peer_uri_san_size"),
        uri_san: sym!("envoy_dynamic_module_callback_access_logger_get_downstream_peer_uri_san"),
        dns_san_size: sym!("envoy_dynamic_module_callback_access_logger_get_downstream_peer_dns_san_size"),
        dns_san: sym!("envoy_dynamic_module_callback_access_logger_get_downstream_peer_dns_san"),
        timing_info: sym!("envoy_dynamic_module_callback_access_logger_get_timing_info"),
    })
}

unsafe fn load_boot_api() -> Result<BootApi, String> {
    #[cfg(authplane_abi_probe)]
    resolve(b"envoy_dynamic_module_callback_from_a_later_abi\0")?;
    Ok(BootApi {
        signal_init_complete: sym!("envoy_dynamic_module_callback_bootstrap_extension_config_signal_init_complete"),
        timer_new: sym!("envoy_dynamic_module_callback_bootstrap_extension_timer_new"),
        timer_enable: sym!("envoy_dynamic_module_callback_bootstrap_extension_timer_enable"),
        timer_delete: sym!("envoy_dynamic_module_callback_bootstrap_extension_timer_delete"),
        http_callout: sym!("envoy_dynamic_module_callback_bootstrap_extension_http_callout"),
    })
}

fn log_api() -> Option<&'static LogApi> {
    match LOG_API.get_or_init(|| unsafe { load_log_api() }) {
        Ok(api) => Some(api),
        Err(missing) => {
            eprintln!("authplane_rules: decision_log logger refused: this Envoy has no {missing} (built for Envoy 1.40)");
            None
        }
    }
}

fn boot_api() -> Option<&'static BootApi> {
    match BOOT_API.get_or_init(|| unsafe { load_boot_api() }) {
        Ok(api) => Some(api),
        Err(missing) => {
            eprintln!("authplane_rules: decision_log extension refused: this Envoy has no {missing} (built for Envoy 1.40)");
            None
        }
    }
}

// ------------------------------------------------------------------------------------------------
// The access logger.

struct LogConfig {
    rbac: Vec<Vec<u8>>,
    ext_authz: Vec<Vec<u8>>,
    headers: Vec<Vec<u8>>,
    max_bytes: usize,
}

fn strings(j: Option<&J>) -> Option<Vec<Vec<u8>>> {
    match j {
        None | Some(J::Null) => Some(Vec::new()),
        Some(v) => v.arr()?.iter().map(|x| x.str().filter(|s| !s.is_empty()).map(|s| s.as_bytes().to_vec())).collect(),
    }
}

fn count(j: Option<&J>, default: u64) -> Option<u64> {
    match j {
        None | Some(J::Null) => Some(default),
        Some(J::Num(n)) => n.parse::<u64>().ok(),
        _ => None,
    }
}

fn log_config(text: &[u8]) -> Option<LogConfig> {
    let j = Parser::parse(if text.is_empty() { b"{}" } else { text })?;
    if !matches!(j, J::Obj(_)) {
        return None;
    }
    Some(LogConfig {
        rbac: strings(j.get("rbac"))?,
        ext_authz: strings(j.get("ext_authz"))?,
        headers: strings(j.get("headers"))?.into_iter().map(|h| h.to_ascii_lowercase()).collect(),
        max_bytes: count(j.get("max_bytes"), DEFAULT_MAX_BYTES as u64)? as usize,
    })
}

unsafe fn out_buf(f: impl FnOnce(*mut Buf) -> bool) -> Option<&'static [u8]> {
    let mut b = Buf::NULL;
    if f(&mut b) && !b.ptr.is_null() {
        Some(b.slice())
    } else {
        None
    }
}

unsafe fn start_ms(api: &LogApi, e: Ptr) -> u64 {
    // The timing struct begins with the start time (ns since the epoch); a generous buffer, and a
    // plausibility check against the clock, so a different layout falls back to "now".
    let mut t = [0i64; 32];
    (api.timing_info)(e, t.as_mut_ptr() as *mut c_void);
    let now = now_ms();
    let ms = (t[0] / 1_000_000) as u64;
    if t[0] > 0 && ms <= now + 60_000 && ms + 86_400_000 >= now { ms } else { now }
}

unsafe fn first_san(api: &LogApi, e: Ptr) -> Option<&'static [u8]> {
    for (size, get) in [(api.uri_san_size, api.uri_san), (api.dns_san_size, api.dns_san)] {
        let n = size(e);
        if n > 0 && n < 4096 {
            let mut sans = vec![Buf::NULL; n];
            if get(e, sans.as_mut_ptr()) && !sans[0].ptr.is_null() && sans[0].len > 0 {
                return Some(sans[0].slice());
            }
        }
    }
    None
}

/// `2026-12-01T16:34:09.067+00:00` (UTC, milliseconds), the decision log's `time`, written here:
/// formatting it is a good part of what authplane would otherwise spend per record.
fn push_iso(out: &mut Vec<u8>, ms: u64) {
    use std::io::Write;
    let (secs, milli) = (ms / 1000, ms % 1000);
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // days since 1970-01-01 to a civil date (proleptic Gregorian)
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let _ = write!(out, "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{milli:03}+00:00",
                   rem / 3600, rem % 3600 / 60, rem % 60);
}

unsafe fn record(api: &LogApi, cfg: &LogConfig, e: Ptr, out: &mut Vec<u8>) {
    push_iso(out, start_ms(api, e));
    let fields: [Option<&[u8]>; 2] = [out_buf(|b| (api.request_id)(e, b)), out_buf(|b| (api.route_name)(e, b))];
    for f in fields {
        out.push(US);
        push_value(out, f.unwrap_or_default());
    }
    out.push(US);
    out.extend_from_slice((api.response_code)(e).to_string().as_bytes());
    out.push(US);
    push_value(out, out_buf(|b| (api.response_code_details)(e, b)).unwrap_or_default());
    out.push(US);
    push_value(out, out_buf(|b| (api.dynamic_metadata)(e, Buf::of(JWT_NS), Buf::of(JWT_SUB), b)).unwrap_or_default());
    out.push(US);
    push_value(out, first_san(api, e).unwrap_or_default());
    let mut pair = |prefix: &[u8], key: &[u8], value: Option<&[u8]>| {
        if let Some(v) = value.filter(|v| !v.is_empty()) {
            out.push(US);
            out.extend_from_slice(prefix);
            push_value(out, key);
            out.push(GS);
            push_value(out, v);
        }
    };
    for k in &cfg.rbac {
        pair(b"r:", k, out_buf(|b| (api.dynamic_metadata)(e, Buf::of(RBAC_NS), Buf::of(k), b)));
    }
    for k in &cfg.ext_authz {
        pair(b"x:", k, out_buf(|b| (api.dynamic_metadata)(e, Buf::of(EXT_AUTHZ_NS), Buf::of(k), b)));
    }
    for h in &cfg.headers {
        let mut n = 0usize;
        pair(b"h:", h, out_buf(|b| (api.header_value)(e, 0, Buf::of(h), b, 0, &mut n)));
    }
}

fn append(cfg: &LogConfig, rec: &[u8]) {
    let mut p = pending();
    let need = rec.len() + usize::from(!p.bytes.is_empty());
    if p.bytes.len() + need > cfg.max_bytes {
        DROPPED.fetch_add(1, Ordering::Relaxed); // before the lock goes: the next flush reports it
        return;
    }
    if !p.bytes.is_empty() {
        p.bytes.push(RS);
    }
    p.bytes.extend_from_slice(rec);
    p.records += 1;
}

thread_local! {
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(512));
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_access_logger_config_new(_e: Ptr, name: Buf, config: Buf) -> *const c_void {
    catch_unwind(|| {
        if name.slice() != b"decision_log" {
            eprintln!("authplane_rules: unknown access logger {:?} (this module has decision_log)", String::from_utf8_lossy(name.slice()));
            return std::ptr::null();
        }
        if log_api().is_none() {
            return std::ptr::null();
        }
        match log_config(config.slice()) {
            Some(c) => Box::into_raw(Box::new(c)) as *const c_void,
            None => {
                eprintln!("authplane_rules: refused decision_log logger configuration (JSON: rbac, ext_authz, headers: lists of strings; max_bytes: a number)");
                std::ptr::null()
            }
        }
    })
    .unwrap_or(std::ptr::null())
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_access_logger_config_destroy(c: *const c_void) {
    if !c.is_null() {
        let _ = catch_unwind(|| drop(Box::from_raw(c as *mut LogConfig)));
    }
}

/// Per worker: the configuration is all a logger needs (the buffer is process-global).
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_access_logger_new(c: *const c_void, _e: Ptr) -> *const c_void {
    c
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_access_logger_log(e: Ptr, l: *const c_void, _log_type: i32) {
    if l.is_null() {
        return;
    }
    let cfg = &*(l as *const LogConfig);
    let _ = catch_unwind(AssertUnwindSafe(|| {
        let Some(Ok(api)) = LOG_API.get() else { return };
        SCRATCH.with(|s| {
            let mut rec = s.borrow_mut();
            rec.clear();
            record(api, cfg, e, &mut rec);
            append(cfg, &rec);
            if rec.capacity() > 64 << 10 {
                *rec = Vec::with_capacity(512);
            }
        });
    }));
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_access_logger_destroy(_l: *const c_void) {}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_access_logger_flush(_l: *const c_void) {}

// ------------------------------------------------------------------------------------------------
// The bootstrap extension: ships the buffer from the main thread.

struct Shipper {
    cluster: Vec<u8>,
    node: Vec<u8>,
    fleet: Vec<u8>,
    authority: Vec<u8>,
    path: Vec<u8>,
    flush_ms: u64,
    max_inflight: usize,
    timeout_ms: u64,
    envoy: Cell<Ptr>,
    timer: Cell<Ptr>,
    /// callout id -> (records, dropped count carried) of the batch in flight.
    inflight: RefCell<HashMap<u64, (u64, u64)>>,
}

fn text(j: &J, key: &str, default: &str) -> Option<Vec<u8>> {
    match j.get(key) {
        None | Some(J::Null) => Some(default.as_bytes().to_vec()),
        Some(v) => v.str().map(|s| s.as_bytes().to_vec()),
    }
}

fn shipper(config: &[u8]) -> Option<Shipper> {
    let j = Parser::parse(config)?;
    if !matches!(j, J::Obj(_)) {
        return None;
    }
    let cluster = text(&j, "cluster", "")?;
    if cluster.is_empty() {
        return None;
    }
    let authority = text(&j, "authority", std::str::from_utf8(&cluster).ok()?)?;
    Some(Shipper {
        node: text(&j, "node", "")?,
        fleet: text(&j, "fleet", "")?,
        authority: if authority.is_empty() { cluster.clone() } else { authority },
        path: text(&j, "path", "/authplane.decisions.v1.DecisionLog/Report")?,
        flush_ms: count(j.get("flush_ms"), 200)?.max(1),
        max_inflight: count(j.get("max_inflight"), 2)?.max(1) as usize,
        timeout_ms: count(j.get("timeout_ms"), 5000)?.max(1),
        cluster,
        envoy: Cell::new(std::ptr::null_mut()),
        timer: Cell::new(std::ptr::null_mut()),
        inflight: RefCell::new(HashMap::new()),
    })
}

/// The gRPC message of a batch: `v1 US node US fleet US dropped RS records`.
fn frame(s: &Shipper, dropped: u64, records: &[u8]) -> Vec<u8> {
    let mut payload = Vec::with_capacity(records.len() + 64);
    payload.extend_from_slice(b"v1");
    payload.push(US);
    push_value(&mut payload, &s.node);
    payload.push(US);
    push_value(&mut payload, &s.fleet);
    payload.push(US);
    payload.extend_from_slice(dropped.to_string().as_bytes());
    payload.push(RS);
    payload.extend_from_slice(records);
    let mut body = Vec::with_capacity(payload.len() + 5);
    body.push(0);
    body.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    body.extend_from_slice(&payload);
    body
}

unsafe fn flush(s: &Shipper, api: &BootApi) {
    if s.inflight.borrow().len() >= s.max_inflight {
        return;
    }
    let (bytes, records, dropped) = {
        let mut p = pending();
        // Taken under the lock `append` counts drops under: a drop is in this batch or the next.
        let dropped = DROPPED.swap(0, Ordering::Relaxed);
        if p.records == 0 && dropped == 0 {
            return;
        }
        let records = std::mem::replace(&mut p.records, 0);
        (std::mem::take(&mut p.bytes), records, dropped)
    };
    let body = frame(s, dropped, &bytes);
    drop(bytes);
    let h = |k: &'static [u8], v: &[u8]| ModuleHeader { key: k.as_ptr(), key_len: k.len(), value: v.as_ptr(), value_len: v.len() };
    let headers = [
        h(b":method", b"POST"),
        h(b":path", &s.path),
        h(b":authority", &s.authority),
        h(b":scheme", b"http"),
        h(b"content-type", b"application/grpc"),
        h(b"te", b"trailers"),
    ];
    let mut id = 0u64;
    let r = (api.http_callout)(s.envoy.get(), &mut id, Buf::of(&s.cluster), headers.as_ptr(), headers.len(), Buf::of(&body), s.timeout_ms);
    if r == 0 {
        s.inflight.borrow_mut().insert(id, (records, dropped));
    } else {
        FAILED_BATCHES.fetch_add(1, Ordering::Relaxed);
        DROPPED.fetch_add(records + dropped, Ordering::Relaxed);
    }
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_bootstrap_extension_config_new(e: Ptr, name: Buf, config: Buf) -> *const c_void {
    catch_unwind(|| {
        if name.slice() != b"decision_log" {
            eprintln!("authplane_rules: unknown bootstrap extension {:?} (this module has decision_log)", String::from_utf8_lossy(name.slice()));
            return std::ptr::null();
        }
        let Some(api) = boot_api() else { return std::ptr::null() };
        let Some(s) = shipper(config.slice()) else {
            eprintln!("authplane_rules: refused decision_log extension configuration (JSON with a cluster)");
            return std::ptr::null();
        };
        s.envoy.set(e);
        // Nothing to wait for: Envoy may start serving at once.
        (api.signal_init_complete)(e);
        Box::into_raw(Box::new(s)) as *const c_void
    })
    .unwrap_or(std::ptr::null())
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_bootstrap_extension_config_destroy(c: *const c_void) {
    if c.is_null() {
        return;
    }
    let _ = catch_unwind(|| {
        let s = Box::from_raw(c as *mut Shipper);
        if let (Some(Ok(api)), false) = (BOOT_API.get(), s.timer.get().is_null()) {
            (api.timer_delete)(s.timer.get());
        }
    });
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_bootstrap_extension_new(c: *const c_void, _e: Ptr) -> *const c_void {
    c
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_bootstrap_extension_server_initialized(_e: Ptr, x: *const c_void) {
    if x.is_null() {
        return;
    }
    let s = &*(x as *const Shipper);
    let _ = catch_unwind(AssertUnwindSafe(|| {
        let Some(Ok(api)) = BOOT_API.get() else { return };
        if s.timer.get().is_null() {
            let t = (api.timer_new)(s.envoy.get());
            if t.is_null() {
                return;
            }
            s.timer.set(t);
        }
        (api.timer_enable)(s.timer.get(), s.flush_ms);
    }));
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_bootstrap_extension_timer_fired(_e: Ptr, c: *const c_void, _t: Ptr) {
    if c.is_null() {
        return;
    }
    let s = &*(c as *const Shipper);
    let _ = catch_unwind(AssertUnwindSafe(|| {
        let Some(Ok(api)) = BOOT_API.get() else { return };
        flush(s, api);
        (api.timer_enable)(s.timer.get(), s.flush_ms);
    }));
}

#[repr(C)]
pub struct EnvoyHeader {
    key: *const u8,
    key_len: usize,
    value: *const u8,
    value_len: usize,
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_bootstrap_extension_http_callout_done(
    _e: Ptr, c: *const c_void, id: u64, result: i32, headers: *const EnvoyHeader, n: usize, _body: *const Buf, _nb: usize,
) {
    if c.is_null() {
        return;
    }
    let s = &*(c as *const Shipper);
    let _ = catch_unwind(AssertUnwindSafe(|| {
        let Some((records, dropped)) = s.inflight.borrow_mut().remove(&id) else { return };
        let hs = if headers.is_null() || n == 0 { &[][..] } else { std::slice::from_raw_parts(headers, n) };
        let value = |name: &[u8]| {
            hs.iter()
                .find(|h| Buf { ptr: h.key, len: h.key_len }.slice() == name)
                .map(|h| Buf { ptr: h.value, len: h.value_len }.slice())
        };
        // A trailers-only gRPC answer carries grpc-status in the headers; otherwise it is in the
        // trailers, which the callout does not hand over: :status 200 is taken as delivered.
        let ok = result == 0 && value(b":status") == Some(b"200") && value(b"grpc-status").map_or(true, |g| g == b"0");
        if ok {
            SENT_BATCHES.fetch_add(1, Ordering::Relaxed);
            SENT_RECORDS.fetch_add(records, Ordering::Relaxed);
        } else {
            FAILED_BATCHES.fetch_add(1, Ordering::Relaxed);
            DROPPED.fetch_add(records + dropped, Ordering::Relaxed);
        }
    }));
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_bootstrap_extension_shutdown(_e: Ptr, _x: *const c_void, done: Option<unsafe extern "C" fn(*mut c_void)>, ctx: *mut c_void) {
    if let Some(done) = done {
        done(ctx);
    }
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_bootstrap_extension_destroy(_x: *const c_void) {}
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_bootstrap_extension_worker_thread_initialized(_e: Ptr, _x: *const c_void) {}
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_bootstrap_extension_drain_started(_e: Ptr, _x: *const c_void) {}
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_bootstrap_extension_config_scheduled(_e: Ptr, _c: *const c_void, _id: u64) {}
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_bootstrap_extension_file_changed(_e: Ptr, _c: *const c_void, _path: Buf, _events: u32) {}
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_bootstrap_extension_admin_request(_e: Ptr, _c: *const c_void, _m: Buf, _p: Buf, _b: Buf) -> u32 {
    404
}
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_bootstrap_extension_cluster_add_or_update(_e: Ptr, _c: *const c_void, _n: Buf) {}
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_bootstrap_extension_cluster_removal(_e: Ptr, _c: *const c_void, _n: Buf) {}
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_bootstrap_extension_listener_add_or_update(_e: Ptr, _c: *const c_void, _n: Buf) {}
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_bootstrap_extension_listener_removal(_e: Ptr, _c: *const c_void, _n: Buf) {}

// ------------------------------------------------------------------------------------------------
// Without Envoy (tests): the record encoding and the buffer.

/// Counters: [pending records, dropped (unreported), batches sent, records sent, failed batches].
#[no_mangle]
pub unsafe extern "C" fn authplane_decision_log_stats(out: *mut u64, n: usize) -> usize {
    let v = [pending().records, DROPPED.load(Ordering::Relaxed), SENT_BATCHES.load(Ordering::Relaxed),
             SENT_RECORDS.load(Ordering::Relaxed), FAILED_BATCHES.load(Ordering::Relaxed)];
    let k = v.len().min(n);
    if !out.is_null() {
        std::ptr::copy_nonoverlapping(v.as_ptr(), out, k);
    }
    k
}
