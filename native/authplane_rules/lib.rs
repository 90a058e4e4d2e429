//! authplane's builtin `extAuth.rules`, decided inside Envoy (an Envoy dynamic module).
//!
//! Rust with the standard library only. The rule table arrives as the per-route configuration of
//! the filter (JSON written by `authplane/compiler/filters/dynamic_module.py`), so a rule edit is an
//! ordinary route update. The meaning mirrors `authplane/authz/evaluate.py` for what the compiler
//! lets through (no regexes, API keys, sign-in redirects or shadow mode: those policies stay on
//! the decision service): first match wins, no match denies.
//!
//! Inputs: `:method`, `:path`, the request headers, and two headers Envoy itself sets just before
//! this filter (a header mutation, replacing any client copy): the client address and the verified
//! JWT payload as JSON. Both are removed from the request on every decision, as are the headers a
//! decision may set (identity headers ...), so a client never forges them upstream.
//!
//! Safety: every hook runs under `catch_unwind` (a panic denies with 500, never unwinds into
//! Envoy); malformed configuration makes the config hooks return null, which Envoy reports as a
//! refused configuration; inputs are bounded (JSON depth and size). Envoy's callbacks are looked up
//! with `dlsym` when the module is loaded: a missing one (another ABI) refuses the load cleanly.
//! `authplane_rules_eval` runs the same evaluation on a JSON request without Envoy (tests, fuzz).

#![allow(non_camel_case_types, clippy::missing_safety_doc, unexpected_cfgs)]

use std::ffi::{c_char, c_void};
use std::net::IpAddr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, OnceLock};

/// The decision log: an access logger and a bootstrap extension of this module.
mod decision_log;

/// The Envoy dynamic modules ABI this module is written against (Envoy 1.40).
pub const ABI_VERSION: &[u8] = b"v0.2.0\0";

/// Read by `authplane validate` from the file (no loading needed): the ABI it was built for.
#[no_mangle]
#[used]
pub static authplane_module_abi: [u8; 27] = *b"authplane-envoy-abi=v0.2.0\0";

const MAX_DEPTH: usize = 64;
const MAX_CONFIG: usize = 16 << 20;
const MAX_PAYLOAD: usize = 64 << 10;
const CLIENT_IP_HEADER: &[u8] = b"x-authplane-client-ip";
const JWT_PAYLOAD_HEADER: &[u8] = b"x-authplane-jwt-payload";

// ------------------------------------------------------------------------------------------------
// JSON (std only): enough for the rule table and a JWT payload; numbers keep their text.

#[derive(Debug, Clone)]
enum J {
    Null,
    Bool(bool),
    Num(String),
    Str(String),
    Arr(Vec<J>),
    Obj(Vec<(String, J)>),
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl<'a> Parser<'a> {
    fn parse(s: &'a [u8]) -> Option<J> {
        let mut p = Parser { s, i: 0 };
        let v = p.value(0)?;
        p.ws();
        if p.i == s.len() { Some(v) } else { None }
    }

    fn ws(&mut self) {
        while self.i < self.s.len() && matches!(self.s[self.i], b' ' | b'\t' | b'\n' | b'\r') {
            self.i += 1;
        }
    }

    fn eat(&mut self, lit: &[u8]) -> bool {
        if self.s[self.i..].starts_with(lit) {
            self.i += lit.len();
            true
        } else {
            false
        }
    }

    fn value(&mut self, depth: usize) -> Option<J> {
        if depth > MAX_DEPTH {
            return None;
        }
        self.ws();
        match *self.s.get(self.i)? {
            b'{' => {
                self.i += 1;
                let mut items = Vec::new();
                self.ws();
                if self.eat(b"}") {
                    return Some(J::Obj(items));
                }
                loop {
                    self.ws();
                    let key = self.string()?;
                    self.ws();
                    if !self.eat(b":") {
                        return None;
                    }
                    let v = self.value(depth + 1)?;
                    items.push((key, v));
                    self.ws();
                    if self.eat(b",") {
                        continue;
                    }
                    return if self.eat(b"}") { Some(J::Obj(items)) } else { None };
                }
            }
            b'[' => {
                self.i += 1;
                let mut items = Vec::new();
                self.ws();
                if self.eat(b"]") {
                    return Some(J::Arr(items));
                }
                loop {
                    items.push(self.value(depth + 1)?);
                    self.ws();
                    if self.eat(b",") {
                        continue;
                    }
                    return if self.eat(b"]") { Some(J::Arr(items)) } else { None };
                }
            }
            b'"' => self.string().map(J::Str),
            b't' => self.eat(b"true").then_some(J::Bool(true)),
            b'f' => self.eat(b"false").then_some(J::Bool(false)),
            b'n' => self.eat(b"null").then_some(J::Null),
            _ => self.number(),
        }
    }

    fn number(&mut self) -> Option<J> {
        let start = self.i;
        self.eat(b"-");
        let digits = |p: &mut Self| {
            let s = p.i;
            while p.i < p.s.len() && p.s[p.i].is_ascii_digit() {
                p.i += 1;
            }
            p.i > s
        };
        let int_start = self.i;
        if !digits(self) {
            return None;
        }
        if self.s[int_start] == b'0' && self.i - int_start > 1 {
            return None;
        }
        if self.eat(b".") && !digits(self) {
            return None;
        }
        if self.i < self.s.len() && (self.s[self.i] == b'e' || self.s[self.i] == b'E') {
            self.i += 1;
            if !self.eat(b"+") {
                self.eat(b"-");
            }
            if !digits(self) {
                return None;
            }
        }
        Some(J::Num(String::from_utf8(self.s[start..self.i].to_vec()).ok()?))
    }

    fn hex4(&mut self) -> Option<u32> {
        let h = self.s.get(self.i..self.i + 4)?;
        self.i += 4;
        u32::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok()
    }

    fn string(&mut self) -> Option<String> {
        if !self.eat(b"\"") {
            return None;
        }
        let mut out: Vec<u8> = Vec::new();
        loop {
            let c = *self.s.get(self.i)?;
            self.i += 1;
            match c {
                b'"' => return String::from_utf8(out).ok(),
                b'\\' => {
                    let e = *self.s.get(self.i)?;
                    self.i += 1;
                    let ch = match e {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'/' => '/',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => {
                            let hi = self.hex4()?;
                            let code = if (0xD800..0xDC00).contains(&hi) {
                                if !self.eat(b"\\u") {
                                    return None;
                                }
                                let lo = self.hex4()?;
                                if !(0xDC00..0xE000).contains(&lo) {
                                    return None;
                                }
                                0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)
                            } else {
                                hi
                            };
                            char::from_u32(code)?
                        }
                        _ => return None,
                    };
                    let mut buf = [0u8; 4];
                    out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                }
                0..=0x1f => return None,
                _ => out.push(c),
            }
        }
    }
}

impl J {
    fn get(&self, key: &str) -> Option<&J> {
        match self {
            // Python's json keeps the last of duplicate keys.
            J::Obj(items) => items.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }
    fn str(&self) -> Option<&str> {
        match self {
            J::Str(s) => Some(s),
            _ => None,
        }
    }
    fn arr(&self) -> Option<&[J]> {
        match self {
            J::Arr(a) => Some(a),
            _ => None,
        }
    }
}

/// Python's ``str()`` of the number ``json.loads`` makes of this JSON number text.
fn py_number(raw: &str) -> Option<String> {
    if !raw.contains(['.', 'e', 'E']) {
        let digits = raw.trim_start_matches('-');
        let zero = digits.bytes().all(|b| b == b'0');
        return Some(if zero { "0".to_string() } else { raw.to_string() });
    }
    let f: f64 = raw.parse().ok()?;
    if !f.is_finite() {
        return None;
    }
    let a = f.abs();
    if f != 0.0 && !(1e-4..1e16).contains(&a) {
        let s = format!("{:e}", f); // 1.5e17, 1e-5
        let (mant, exp) = s.split_once('e')?;
        let (sign, digits) = exp.strip_prefix('-').map_or(("+", exp), |d| ("-", d));
        return Some(format!("{mant}e{sign}{digits:0>2}"));
    }
    let s = format!("{:?}", f);
    Some(if s.contains(['.', 'e']) { s } else { format!("{s}.0") })
}

// ------------------------------------------------------------------------------------------------
// The rule table.

type Bytes = Vec<u8>;

#[derive(Default)]
struct Values {
    exact: Vec<Bytes>,
    prefixes: Vec<Bytes>,
    present: bool,
}

#[derive(Default)]
struct Matcher {
    claims: Vec<(Vec<String>, Values)>,
    headers: Vec<(Bytes, Values)>,
    networks: Vec<(IpAddr, u8)>,
    methods: Vec<Bytes>,
    paths: Vec<Bytes>,
    prefixes: Vec<Bytes>,
    scopes: Vec<String>,
    authenticated: Option<bool>,
    ignore_case: bool,
    negate: Option<Box<Matcher>>,
}

struct Response {
    status: u32,
    body: Bytes,
    headers: Vec<(Bytes, Bytes)>,
}

struct Rule {
    name: String,
    allow: bool,
    when: Matcher,
    upstream: Vec<(Bytes, Bytes)>,
    remove: Vec<Bytes>,
    response: Vec<(Bytes, Bytes)>,
    deny: Response,
}

struct Policy {
    rules: Vec<Rule>,
    identity: bool,
    strip: Vec<Bytes>,
    no_match: Response,
}

fn bytes_list(v: Option<&J>) -> Option<Vec<Bytes>> {
    match v {
        None => Some(Vec::new()),
        Some(j) => j.arr()?.iter().map(|x| x.str().map(|s| s.as_bytes().to_vec())).collect(),
    }
}

fn string_list(v: Option<&J>) -> Option<Vec<String>> {
    match v {
        None => Some(Vec::new()),
        Some(j) => j.arr()?.iter().map(|x| x.str().map(str::to_string)).collect(),
    }
}

fn pairs(v: Option<&J>) -> Option<Vec<(Bytes, Bytes)>> {
    let Some(j) = v else { return Some(Vec::new()) };
    j.arr()?
        .iter()
        .map(|p| {
            let p = p.arr()?;
            if p.len() != 2 {
                return None;
            }
            Some((p[0].str()?.as_bytes().to_vec(), p[1].str()?.as_bytes().to_vec()))
        })
        .collect()
}

fn header_name_ok(name: &[u8]) -> bool {
    !name.is_empty() && name.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.!#$%&'*+^`|~".contains(b))
}

fn values(j: &J) -> Option<Values> {
    let present = match j.get("present") {
        None => false,
        Some(J::Bool(b)) => *b,
        _ => return None,
    };
    Some(Values { exact: bytes_list(j.get("exact"))?, prefixes: bytes_list(j.get("prefixes"))?, present })
}

fn cidr(s: &str) -> Option<(IpAddr, u8)> {
    let (ip, bits) = s.split_once('/')?;
    let ip: IpAddr = ip.parse().ok()?;
    let bits: u8 = bits.parse().ok()?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    (bits <= max).then_some((ip, bits))
}

fn matcher(j: &J, depth: usize) -> Option<Matcher> {
    if depth > MAX_DEPTH || !matches!(j, J::Obj(_)) {
        return None;
    }
    let mut m = Matcher::default();
    if let Some(c) = j.get("claims") {
        for p in c.arr()? {
            let p = p.arr()?;
            if p.len() != 2 {
                return None;
            }
            let path = string_list(Some(&p[0]))?;
            if path.is_empty() {
                return None;
            }
            m.claims.push((path, values(&p[1])?));
        }
    }
    if let Some(h) = j.get("headers") {
        for p in h.arr()? {
            let p = p.arr()?;
            if p.len() != 2 {
                return None;
            }
            let name = p[0].str()?.as_bytes().to_vec();
            if !header_name_ok(&name) {
                return None;
            }
            m.headers.push((name, values(&p[1])?));
        }
    }
    for c in string_list(j.get("cidrs"))? {
        m.networks.push(cidr(&c)?);
    }
    m.methods = bytes_list(j.get("methods"))?;
    m.paths = bytes_list(j.get("paths"))?;
    m.prefixes = bytes_list(j.get("prefixes"))?;
    m.scopes = string_list(j.get("scopes"))?;
    m.authenticated = match j.get("authenticated") {
        None | Some(J::Null) => None,
        Some(J::Bool(b)) => Some(*b),
        _ => return None,
    };
    m.ignore_case = matches!(j.get("ignoreCase"), Some(J::Bool(true)));
    if let Some(n) = j.get("not") {
        m.negate = Some(Box::new(matcher(n, depth + 1)?));
    }
    Some(m)
}

fn status(j: Option<&J>) -> Option<u32> {
    match j? {
        J::Num(n) => n.parse::<u32>().ok().filter(|s| (200..600).contains(s)),
        _ => None,
    }
}

fn response(j: &J) -> Option<Response> {
    Some(Response {
        status: status(j.get("status"))?,
        body: j.get("body").map_or(Some(""), J::str)?.as_bytes().to_vec(),
        headers: pairs(j.get("headers"))?,
    })
}

fn rule(j: &J) -> Option<Rule> {
    let allow = match j.get("action")?.str()? {
        "allow" => true,
        "deny" => false,
        _ => return None,
    };
    Some(Rule {
        name: j.get("name")?.str()?.to_string(),
        allow,
        when: matcher(j.get("when").unwrap_or(&J::Obj(Vec::new())), 0)?,
        upstream: pairs(j.get("upstream"))?,
        remove: bytes_list(j.get("remove"))?,
        response: pairs(j.get("response"))?,
        deny: response(j.get("deny")?)?,
    })
}

fn policy(text: &[u8]) -> Option<Policy> {
    if text.len() > MAX_CONFIG {
        return None;
    }
    let j = Parser::parse(text)?;
    if j.get("version")?.str()? != "1" {
        return None;
    }
    let rules = j.get("rules")?.arr()?.iter().map(rule).collect::<Option<Vec<_>>>()?;
    let identity = match j.get("identityHeaders") {
        None => false,
        Some(J::Bool(b)) => *b,
        _ => return None,
    };
    Some(Policy { rules, identity, strip: bytes_list(j.get("strip"))?, no_match: response(j.get("noMatch")?)? })
}

// ------------------------------------------------------------------------------------------------
// Evaluation (mirrors authplane/authz/evaluate.py).

trait Req {
    fn header(&self, name: &[u8]) -> Option<&[u8]>;
    fn method(&self) -> &[u8];
    fn path(&self) -> &[u8];
    fn source(&self) -> &[u8];
    fn claims(&self) -> Option<&J>;
}

fn string_matches(v: &[u8], w: &Values) -> bool {
    w.exact.iter().any(|e| e == v) || w.prefixes.iter().any(|p| v.starts_with(p))
}

fn claim_matches(v: Option<&J>, w: &Values) -> bool {
    let Some(v) = v else { return false };
    if w.present {
        return true;
    }
    match v {
        J::Arr(xs) => xs.iter().any(|x| x.str().is_some_and(|s| string_matches(s.as_bytes(), w))),
        J::Str(s) => string_matches(s.as_bytes(), w),
        J::Bool(b) => w.exact.iter().any(|e| e == if *b { b"true".as_slice() } else { b"false" }),
        J::Num(n) => py_number(n).is_some_and(|s| w.exact.iter().any(|e| e == s.as_bytes())),
        _ => false,
    }
}

fn claim_at<'a>(claims: &'a J, path: &[String]) -> Option<&'a J> {
    path.iter().try_fold(claims, |v, part| v.get(part))
}

fn scopes(v: Option<&J>) -> Vec<&str> {
    match v {
        Some(J::Str(s)) => s.split(' ').collect(),
        Some(J::Arr(a)) => a.iter().filter_map(J::str).collect(),
        _ => Vec::new(),
    }
}

fn trim_slash(p: &[u8]) -> &[u8] {
    if p.len() > 1 && p.ends_with(b"/") { &p[..p.len() - 1] } else { p }
}

fn in_network(ip: IpAddr, net: &(IpAddr, u8)) -> bool {
    let bits = net.1 as u32;
    match (ip, net.0) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            let mask = if bits == 0 { 0 } else { u32::MAX << (32 - bits) };
            u32::from(a) & mask == u32::from(b) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            let mask = if bits == 0 { 0 } else { u128::MAX << (128 - bits) };
            u128::from(a) & mask == u128::from(b) & mask
        }
        _ => false,
    }
}

fn matches(m: &Matcher, r: &dyn Req) -> bool {
    if !m.methods.is_empty() && !m.methods.iter().any(|x| x == r.method()) {
        return false;
    }
    if !(m.paths.is_empty() && m.prefixes.is_empty()) {
        let full = r.path();
        let bare = &full[..full.iter().position(|&b| b == b'?').unwrap_or(full.len())];
        let folded = if m.ignore_case { bare.to_ascii_lowercase() } else { bare.to_vec() };
        let trimmed = trim_slash(&folded);
        if !(m.paths.iter().any(|p| p == trimmed) || m.prefixes.iter().any(|p| folded.starts_with(p))) {
            return false;
        }
    }
    for (name, w) in &m.headers {
        match r.header(name) {
            Some(v) if w.present || string_matches(v, w) => {}
            _ => return false,
        }
    }
    if !m.networks.is_empty() {
        let ip = std::str::from_utf8(r.source()).ok().and_then(|s| s.parse::<IpAddr>().ok());
        match ip {
            Some(ip) if m.networks.iter().any(|n| in_network(ip, n)) => {}
            _ => return false,
        }
    }
    if let Some(want) = m.authenticated {
        if want != r.claims().is_some() {
            return false;
        }
    }
    if !m.claims.is_empty() || !m.scopes.is_empty() {
        let Some(c) = r.claims() else { return false };
        if !m.claims.iter().all(|(path, w)| claim_matches(claim_at(c, path), w)) {
            return false;
        }
        let mut held = scopes(c.get("scope"));
        held.extend(scopes(c.get("scp")));
        if !m.scopes.iter().all(|s| held.contains(&s.as_str())) {
            return false;
        }
    }
    m.negate.as_ref().map_or(true, |n| !matches(n, r))
}

enum Decision<'a> {
    Allow { rule: &'a Rule, upstream: Vec<(Bytes, Bytes)>, remove: Vec<&'a [u8]> },
    Deny(&'a Response),
}

fn identity(claims: Option<&J>) -> [Bytes; 3] {
    let get = |k: &str| claims.and_then(|c| c.get(k));
    let text = |k: &str| get(k).and_then(J::str).unwrap_or("").as_bytes().to_vec();
    let groups = match get("groups") {
        Some(J::Arr(a)) => a.iter().filter_map(J::str).collect::<Vec<_>>().join(",").into_bytes(),
        Some(J::Str(s)) => s.as_bytes().to_vec(),
        _ => Vec::new(),
    };
    [text("sub"), text("email"), groups]
}

const IDENTITY_HEADERS: [&[u8]; 3] = [b"x-auth-request-user", b"x-auth-request-email", b"x-auth-request-groups"];

fn decide<'a>(p: &'a Policy, r: &dyn Req) -> Decision<'a> {
    let Some(rule) = p.rules.iter().find(|rule| matches(&rule.when, r)) else {
        return Decision::Deny(&p.no_match);
    };
    if !rule.allow {
        return Decision::Deny(&rule.deny);
    }
    let mut upstream: Vec<(Bytes, Bytes)> = Vec::with_capacity(rule.upstream.len() + 3);
    for (k, v) in &rule.upstream {
        set_pair(&mut upstream, k, v);
    }
    if p.identity {
        for (name, value) in IDENTITY_HEADERS.iter().zip(identity(r.claims())) {
            if !value.is_empty() {
                set_pair(&mut upstream, name, &value);
            }
        }
    }
    let mut remove: Vec<&[u8]> = Vec::new();
    for h in rule.remove.iter().chain(&p.strip) {
        if !upstream.iter().any(|(k, _)| k == h) && !remove.contains(&h.as_slice()) {
            remove.push(h);
        }
    }
    Decision::Allow { rule, upstream, remove }
}

fn set_pair(list: &mut Vec<(Bytes, Bytes)>, k: &[u8], v: &[u8]) {
    match list.iter_mut().find(|(n, _)| n == k) {
        Some(slot) => slot.1 = v.to_vec(),
        None => list.push((k.to_vec(), v.to_vec())),
    }
}

fn parse_claims(payload: Option<&[u8]>) -> Option<J> {
    let p = payload?;
    if p.is_empty() || p.len() > MAX_PAYLOAD {
        return None;
    }
    Parser::parse(p).filter(|j| matches!(j, J::Obj(_)))
}

// ------------------------------------------------------------------------------------------------
// Envoy's side of the ABI: callbacks resolved at load, hooks exported.

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Buf {
    ptr: *const u8,
    len: usize,
}

impl Buf {
    fn of(s: &[u8]) -> Buf {
        Buf { ptr: s.as_ptr(), len: s.len() }
    }
    const NULL: Buf = Buf { ptr: std::ptr::null(), len: 0 };
    unsafe fn slice<'a>(self) -> &'a [u8] {
        if self.ptr.is_null() || self.len == 0 { &[] } else { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

#[repr(C)]
pub struct ModuleHeader {
    key: *const u8,
    key_len: usize,
    value: *const u8,
    value_len: usize,
}

type Envoy = *mut c_void;
const REQUEST: i32 = 0;
const RESPONSE: i32 = 2;

struct Api {
    get_header: unsafe extern "C" fn(Envoy, i32, Buf, *mut Buf, usize, *mut usize) -> bool,
    set_header: unsafe extern "C" fn(Envoy, i32, Buf, Buf) -> bool,
    add_header: unsafe extern "C" fn(Envoy, i32, Buf, Buf) -> bool,
    send_response: unsafe extern "C" fn(Envoy, u32, *const ModuleHeader, usize, Buf, Buf),
    route_config: unsafe extern "C" fn(Envoy) -> *const c_void,
}

static API: OnceLock<Api> = OnceLock::new();

extern "C" {
    fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
}

unsafe fn resolve(name: &[u8]) -> Result<*mut c_void, String> {
    let p = dlsym(std::ptr::null_mut(), name.as_ptr() as *const c_char); // RTLD_DEFAULT
    if p.is_null() {
        Err(String::from_utf8_lossy(&name[..name.len() - 1]).into_owned())
    } else {
        Ok(p)
    }
}

unsafe fn load_api() -> Result<Api, String> {
    // Built with `--cfg authplane_abi_probe` (a test): a callback no Envoy has, as if built for a
    // later ABI, to prove the refusal path.
    #[cfg(authplane_abi_probe)]
    resolve(b"envoy_dynamic_module_callback_from_a_later_abi\0")?;
    Ok(Api {
        get_header: std::mem::transmute(resolve(b"envoy_dynamic_module_callback_http_get_header\0")?),
        set_header: std::mem::transmute(resolve(b"envoy_dynamic_module_callback_http_set_header\0")?),
        add_header: std::mem::transmute(resolve(b"envoy_dynamic_module_callback_http_add_header\0")?),
        send_response: std::mem::transmute(resolve(b"envoy_dynamic_module_callback_http_send_response\0")?),
        route_config: std::mem::transmute(resolve(b"envoy_dynamic_module_callback_get_most_specific_route_config\0")?),
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_program_init() -> *const c_char {
    match catch_unwind(|| unsafe { load_api() }) {
        Ok(Ok(api)) => {
            let _ = API.set(api);
            ABI_VERSION.as_ptr() as *const c_char
        }
        Ok(Err(missing)) => {
            eprintln!(
                "authplane_rules: refused: this Envoy has no {missing}; the module is built for the \
                 dynamic modules ABI {} (Envoy 1.40)",
                String::from_utf8_lossy(&ABI_VERSION[..ABI_VERSION.len() - 1])
            );
            std::ptr::null()
        }
        Err(_) => std::ptr::null(),
    }
}

/// The listener-level config carries nothing but must be a JSON object.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_new(_e: *mut c_void, _name: Buf, config: Buf) -> *const c_void {
    catch_unwind(|| {
        let text = config.slice();
        match Parser::parse(if text.is_empty() { b"{}" } else { text }) {
            Some(J::Obj(_)) => Box::into_raw(Box::new(0u8)) as *const c_void,
            _ => {
                eprintln!("authplane_rules: refused filter configuration (not a JSON object)");
                std::ptr::null()
            }
        }
    })
    .unwrap_or(std::ptr::null())
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(p: *const c_void) {
    if !p.is_null() {
        drop(Box::from_raw(p as *mut u8));
    }
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_per_route_config_new(_name: Buf, config: Buf) -> *const c_void {
    catch_unwind(|| match policy(config.slice()) {
        Some(p) => Arc::into_raw(Arc::new(p)) as *const c_void,
        None => {
            eprintln!("authplane_rules: refused route configuration (not an authplane rule table, version 1)");
            std::ptr::null()
        }
    })
    .unwrap_or(std::ptr::null())
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_per_route_config_destroy(p: *const c_void) {
    if !p.is_null() {
        drop(Arc::from_raw(p as *const Policy));
    }
}

/// One per stream: the policy (kept alive for the stream) and the allow rule whose response
/// headers go to the client.
struct Stream {
    policy: Option<Arc<Policy>>,
    rule: Option<usize>,
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_new(_c: *const c_void, _e: Envoy) -> *const c_void {
    Box::into_raw(Box::new(Stream { policy: None, rule: None })) as *const c_void
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_destroy(f: *const c_void) {
    if !f.is_null() {
        drop(Box::from_raw(f as *mut Stream));
    }
}

struct EnvoyReq {
    e: Envoy,
    method: Bytes,
    path: Bytes,
    source: Bytes,
    claims: Option<J>,
}

unsafe fn header(e: Envoy, kind: i32, name: &[u8]) -> Option<&'static [u8]> {
    let api = API.get()?;
    let mut out = Buf::NULL;
    let mut count = 0usize;
    if !(api.get_header)(e, kind, Buf::of(name), &mut out, 0, &mut count) || count == 0 || out.ptr.is_null() {
        return None;
    }
    Some(out.slice())
}

impl Req for EnvoyReq {
    fn header(&self, name: &[u8]) -> Option<&[u8]> {
        // Valid until the next header change: evaluation changes none. Envoy keeps the Host header
        // as `:authority`; the decision service sees it as `host`.
        let name = if name == b"host" { b":authority".as_slice() } else { name };
        unsafe { header(self.e, REQUEST, name) }
    }
    fn method(&self) -> &[u8] {
        &self.method
    }
    fn path(&self) -> &[u8] {
        &self.path
    }
    fn source(&self) -> &[u8] {
        &self.source
    }
    fn claims(&self) -> Option<&J> {
        self.claims.as_ref()
    }
}

unsafe fn send(e: Envoy, r: &Response) {
    let api = API.get().expect("initialised");
    let headers: Vec<ModuleHeader> = r
        .headers
        .iter()
        .map(|(k, v)| ModuleHeader { key: k.as_ptr(), key_len: k.len(), value: v.as_ptr(), value_len: v.len() })
        .collect();
    (api.send_response)(e, r.status, headers.as_ptr(), headers.len(), Buf::of(&r.body), Buf::of(b"authplane_rules"));
}

const FAILED: Response = Response { status: 500, body: Vec::new(), headers: Vec::new() };
const CONTINUE: i32 = 0;
const STOP: i32 = 1;

unsafe fn on_request(e: Envoy, s: &mut Stream) -> i32 {
    let Some(api) = API.get() else { return STOP };
    let cfg = (api.route_config)(e) as *const Policy;
    let own = |h: &[u8]| header(e, REQUEST, h).map(<[u8]>::to_vec);
    let req = EnvoyReq {
        e,
        method: own(b":method").unwrap_or_default(),
        path: own(b":path").unwrap_or_default(),
        source: own(CLIENT_IP_HEADER).unwrap_or_default(),
        claims: parse_claims(header(e, REQUEST, JWT_PAYLOAD_HEADER)),
    };
    for h in [CLIENT_IP_HEADER, JWT_PAYLOAD_HEADER] {
        (api.set_header)(e, REQUEST, Buf::of(h), Buf::NULL);
    }
    if cfg.is_null() {
        let none = Response { status: 403, body: b"authplane: no policy for this route\n".to_vec(), headers: vec![(b"content-type".to_vec(), b"text/plain".to_vec())] };
        send(e, &none);
        return STOP;
    }
    Arc::increment_strong_count(cfg);
    let policy = Arc::from_raw(cfg);
    let status = match decide(&policy, &req) {
        Decision::Deny(r) => {
            send(e, r);
            STOP
        }
        Decision::Allow { rule, upstream, remove } => {
            for h in remove {
                (api.set_header)(e, REQUEST, Buf::of(h), Buf::NULL);
            }
            for (k, v) in &upstream {
                (api.set_header)(e, REQUEST, Buf::of(k), Buf::of(v));
            }
            if !rule.response.is_empty() {
                s.rule = policy.rules.iter().position(|r| std::ptr::eq(r, rule));
            }
            CONTINUE
        }
    };
    s.policy = Some(policy);
    status
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_request_headers(e: Envoy, f: *const c_void, _eos: bool) -> i32 {
    let s = &mut *(f as *mut Stream);
    match catch_unwind(AssertUnwindSafe(|| on_request(e, s))) {
        Ok(status) => status,
        Err(_) => {
            let _ = catch_unwind(|| send(e, &FAILED));
            STOP
        }
    }
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_response_headers(e: Envoy, f: *const c_void, _eos: bool) -> i32 {
    let s = &*(f as *const Stream);
    let _ = catch_unwind(AssertUnwindSafe(|| {
        if let (Some(p), Some(i), Some(api)) = (&s.policy, s.rule, API.get()) {
            for (k, v) in &p.rules[i].response {
                (api.add_header)(e, RESPONSE, Buf::of(k), Buf::of(v));
            }
        }
    }));
    CONTINUE
}

// Hooks this filter has no use for (Envoy requires every one of them).
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_body(_e: Envoy, _f: *const c_void, _eos: bool) -> i32 { CONTINUE }
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_trailers(_e: Envoy, _f: *const c_void) -> i32 { CONTINUE }
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_body(_e: Envoy, _f: *const c_void, _eos: bool) -> i32 { CONTINUE }
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_trailers(_e: Envoy, _f: *const c_void) -> i32 { CONTINUE }
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_stream_complete(_e: Envoy, _f: *const c_void) {}
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_local_reply(_e: Envoy, _f: *const c_void, _code: u32, _d: Buf, _r: bool) -> i32 { CONTINUE }
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_scheduled(_e: Envoy, _f: *const c_void, _id: u64) {}
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_scheduled(_e: *mut c_void, _c: *const c_void, _id: u64) {}
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_callout_done(_e: Envoy, _f: *const c_void, _id: u64, _r: i32, _h: *const c_void, _hn: usize, _b: *const c_void, _bn: usize) {}
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_headers(_e: Envoy, _f: *const c_void, _id: u64, _h: *const c_void, _n: usize, _eos: bool) {}
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_data(_e: Envoy, _f: *const c_void, _id: u64, _d: *const c_void, _n: usize, _eos: bool) {}
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_trailers(_e: Envoy, _f: *const c_void, _id: u64, _h: *const c_void, _n: usize) {}
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_complete(_e: Envoy, _f: *const c_void, _id: u64) {}
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_reset(_e: Envoy, _f: *const c_void, _id: u64, _r: i32) {}
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_callout_done(_e: *mut c_void, _c: *const c_void, _id: u64, _r: i32, _h: *const c_void, _hn: usize, _b: *const c_void, _bn: usize) {}
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_headers(_e: *mut c_void, _c: *const c_void, _id: u64, _h: *const c_void, _n: usize, _eos: bool) {}
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_data(_e: *mut c_void, _c: *const c_void, _id: u64, _d: *const c_void, _n: usize, _eos: bool) {}
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_trailers(_e: *mut c_void, _c: *const c_void, _id: u64, _h: *const c_void, _n: usize) {}
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_complete(_e: *mut c_void, _c: *const c_void, _id: u64) {}
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_reset(_e: *mut c_void, _c: *const c_void, _id: u64, _r: i32) {}
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark(_e: Envoy, _f: *const c_void) {}
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark(_e: Envoy, _f: *const c_void) {}

// ------------------------------------------------------------------------------------------------
// Without Envoy: the same evaluation on a JSON request (tests, the fixed-seed fuzz).

struct JsonReq {
    method: Bytes,
    path: Bytes,
    source: Bytes,
    headers: Vec<(Bytes, Bytes)>,
    claims: Option<J>,
}

impl Req for JsonReq {
    fn header(&self, name: &[u8]) -> Option<&[u8]> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_slice())
    }
    fn method(&self) -> &[u8] {
        &self.method
    }
    fn path(&self) -> &[u8] {
        &self.path
    }
    fn source(&self) -> &[u8] {
        &self.source
    }
    fn claims(&self) -> Option<&J> {
        self.claims.as_ref()
    }
}

fn json_str(out: &mut String, b: &[u8]) {
    out.push('"');
    for ch in String::from_utf8_lossy(b).chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

fn json_pairs(out: &mut String, list: &[(Bytes, Bytes)]) {
    out.push('[');
    for (i, (k, v)) in list.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push('[');
        json_str(out, k);
        out.push(',');
        json_str(out, v);
        out.push(']');
    }
    out.push(']');
}

fn eval_json(config: &[u8], request: &[u8]) -> Result<String, &'static str> {
    let p = policy(config).ok_or("config")?;
    let r = Parser::parse(request).ok_or("request")?;
    let text = |k: &str| r.get(k).and_then(J::str).unwrap_or("").as_bytes().to_vec();
    let headers = match r.get("headers") {
        Some(J::Obj(items)) => items.iter().filter_map(|(k, v)| Some((k.as_bytes().to_vec(), v.str()?.as_bytes().to_vec()))).collect(),
        _ => Vec::new(),
    };
    let req = JsonReq {
        method: text("method"),
        path: text("path"),
        source: text("source"),
        headers,
        claims: r.get("payload").and_then(J::str).and_then(|s| parse_claims(Some(s.as_bytes()))),
    };
    let mut out = String::new();
    match decide(&p, &req) {
        Decision::Deny(d) => {
            out.push_str(&format!("{{\"allow\":false,\"status\":{},\"body\":", d.status));
            json_str(&mut out, &d.body);
            out.push_str(",\"headers\":");
            json_pairs(&mut out, &d.headers);
        }
        Decision::Allow { rule, upstream, remove } => {
            out.push_str("{\"allow\":true,\"rule\":");
            json_str(&mut out, rule.name.as_bytes());
            out.push_str(",\"upstream\":");
            json_pairs(&mut out, &upstream);
            out.push_str(",\"remove\":[");
            for (i, h) in remove.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                json_str(&mut out, h);
            }
            out.push_str("],\"response\":");
            json_pairs(&mut out, &rule.response);
        }
    }
    out.push('}');
    Ok(out)
}

/// Evaluates ``request`` (JSON: method, path, source, headers, payload) against the rule table
/// ``config``; writes the decision as JSON into ``out``. Returns its length, -1 for a refused
/// config, -2 for a malformed request, -3 when ``out`` is too small, -4 after a panic.
#[no_mangle]
pub unsafe extern "C" fn authplane_rules_eval(config: *const u8, config_len: usize, request: *const u8, request_len: usize, out: *mut u8, out_cap: usize) -> isize {
    let result = catch_unwind(|| {
        let c = Buf { ptr: config, len: config_len }.slice();
        let r = Buf { ptr: request, len: request_len }.slice();
        eval_json(c, r)
    });
    match result {
        Ok(Ok(s)) if s.len() <= out_cap => {
            std::ptr::copy_nonoverlapping(s.as_ptr(), out, s.len());
            s.len() as isize
        }
        Ok(Ok(_)) => -3,
        Ok(Err("config")) => -1,
        Ok(Err(_)) => -2,
        Err(_) => -4,
    }
}

/// 1 when ``config`` is a rule table the module accepts (what Envoy's route config hook checks).
#[no_mangle]
pub unsafe extern "C" fn authplane_rules_config_ok(config: *const u8, config_len: usize) -> i32 {
    catch_unwind(|| policy(Buf { ptr: config, len: config_len }.slice()).is_some() as i32).unwrap_or(-4)
}
