/*
 * An example Envoy dynamic module (HTTP filter) for authplane's `filters:` section, in plain C.
 *
 * What it does, on every request it sees:
 *   - appends its filter name to the request header `x-module-trace` (comma separated), so a test
 *     can read the order of the modules and of the checks around them upstream;
 *   - sets the request headers its configuration lists, one `name: value` per line.
 * A configuration line without `:` is refused: Envoy then refuses the configuration, cleanly.
 * A route's configuration (`typed_per_filter_config`), when there is one, replaces the headers of
 * the filter's configuration there; the name traced is always the filter's.
 *
 * Build (the tests do it into a temporary directory, see tests/support/native.py):
 *   cc -shared -fPIC -O2 -Wl,-z,now -o libexample_filter.so example_filter.c
 * `-z now` binds every Envoy callback when Envoy loads the module: against an Envoy without one of
 * them, loading fails with a message naming it instead of failing later, mid-request.
 *
 * The declarations below are the part of Envoy's dynamic modules ABI (v0.2.0, Envoy 1.40) this
 * filter uses, written for this example.
 */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define ABI_VERSION "v0.2.0"

/* Read by `authplane validate` from the file: the ABI the module was built for. */
__attribute__((used, visibility("default"))) const char authplane_module_abi[] =
    "authplane-envoy-abi=" ABI_VERSION;

typedef struct {
  const char *ptr;
  size_t length;
} buffer; /* envoy_dynamic_module_type_{module,envoy}_buffer */

enum { REQUEST_HEADERS = 0 }; /* envoy_dynamic_module_type_http_header_type_RequestHeader */
enum { CONTINUE = 0 };        /* ..._headers_status_Continue and friends */

extern bool envoy_dynamic_module_callback_http_get_header(void *filter, int type, buffer key,
                                                          buffer *value, size_t index,
                                                          size_t *count);
extern bool envoy_dynamic_module_callback_http_set_header(void *filter, int type, buffer key,
                                                          buffer value);
extern const void *envoy_dynamic_module_callback_get_most_specific_route_config(void *filter);

#define MAX_HEADERS 32
#define MAX_TEXT 4096

typedef struct {
  char name[64];
  size_t name_len;
  char text[MAX_TEXT]; /* the configuration, with each `:` and newline replaced by NUL */
  size_t count;
  const char *keys[MAX_HEADERS], *values[MAX_HEADERS];
} config;

static bool is_space(char c) { return c == ' ' || c == '\t' || c == '\r'; }

/* Parses `name: value` lines into `c` (empty lines are skipped). False: refused. */
static bool parse(config *c, buffer name, buffer text) {
  memset(c, 0, sizeof *c);
  if (name.length >= sizeof c->name || text.length >= MAX_TEXT) return false;
  if (name.length) memcpy(c->name, name.ptr, name.length);
  c->name_len = name.length;
  if (text.length) memcpy(c->text, text.ptr, text.length);
  char *p = c->text, *end = c->text + text.length;
  while (p < end) {
    char *nl = memchr(p, '\n', (size_t)(end - p));
    char *line_end = nl ? nl : end;
    *line_end = '\0';
    while (p < line_end && is_space(*p)) p++;
    if (p < line_end) {
      char *colon = memchr(p, ':', (size_t)(line_end - p));
      if (!colon || colon == p || c->count == MAX_HEADERS) return false;
      *colon = '\0';
      char *v = colon + 1;
      while (v < line_end && is_space(*v)) v++;
      for (char *k = p; k < colon; k++)
        if (*k < '!' || *k > '~' || (*k >= 'A' && *k <= 'Z')) return false; /* lowercase token */
      c->keys[c->count] = p;
      c->values[c->count] = v;
      c->count++;
    }
    p = line_end + 1;
  }
  return true;
}

const char *envoy_dynamic_module_on_program_init(void) { return ABI_VERSION; }

const void *envoy_dynamic_module_on_http_filter_config_new(void *envoy, buffer name, buffer text) {
  (void)envoy;
  config *c = malloc(sizeof *c);
  if (c && !parse(c, name, text)) {
    free(c);
    c = NULL;
  }
  return c; /* NULL: Envoy refuses the configuration */
}

void envoy_dynamic_module_on_http_filter_config_destroy(const void *c) { free((void *)c); }

const void *envoy_dynamic_module_on_http_filter_per_route_config_new(buffer name, buffer text) {
  return envoy_dynamic_module_on_http_filter_config_new(NULL, name, text);
}

void envoy_dynamic_module_on_http_filter_per_route_config_destroy(const void *c) { free((void *)c); }

/* The stream keeps only the filter's configuration: nothing is allocated per request. */
const void *envoy_dynamic_module_on_http_filter_new(const void *c, void *envoy) {
  (void)envoy;
  return c;
}

void envoy_dynamic_module_on_http_filter_destroy(const void *f) { (void)f; }

static buffer text(const char *s) { return (buffer){s, strlen(s)}; }

int envoy_dynamic_module_on_http_filter_request_headers(void *envoy, const void *f, bool eos) {
  (void)eos;
  const config *c = f, *route = envoy_dynamic_module_callback_get_most_specific_route_config(envoy);
  buffer key = text("x-module-trace"), old = {0};
  size_t count = 0;
  char trace[1024];
  size_t n = 0;
  if (envoy_dynamic_module_callback_http_get_header(envoy, REQUEST_HEADERS, key, &old, 0, &count) &&
      count > 0 && old.ptr && old.length + c->name_len + 1 < sizeof trace) {
    memcpy(trace, old.ptr, old.length);
    n = old.length;
    trace[n++] = ',';
  }
  if (n + c->name_len < sizeof trace) {
    memcpy(trace + n, c->name, c->name_len);
    n += c->name_len;
    envoy_dynamic_module_callback_http_set_header(envoy, REQUEST_HEADERS, key, (buffer){trace, n});
  }
  const config *h = route ? route : c;
  for (size_t i = 0; i < h->count; i++)
    envoy_dynamic_module_callback_http_set_header(envoy, REQUEST_HEADERS, text(h->keys[i]),
                                                  text(h->values[i]));
  return CONTINUE;
}

/* The hooks Envoy requires that this filter has no use for. */
int envoy_dynamic_module_on_http_filter_request_body(void *e, const void *f, bool eos) { return CONTINUE; }
int envoy_dynamic_module_on_http_filter_request_trailers(void *e, const void *f) { return CONTINUE; }
int envoy_dynamic_module_on_http_filter_response_headers(void *e, const void *f, bool eos) { return CONTINUE; }
int envoy_dynamic_module_on_http_filter_response_body(void *e, const void *f, bool eos) { return CONTINUE; }
int envoy_dynamic_module_on_http_filter_response_trailers(void *e, const void *f) { return CONTINUE; }
int envoy_dynamic_module_on_http_filter_local_reply(void *e, const void *f, uint32_t code, buffer d, bool r) { return CONTINUE; }
void envoy_dynamic_module_on_http_filter_stream_complete(void *e, const void *f) {}
void envoy_dynamic_module_on_http_filter_scheduled(void *e, const void *f, uint64_t id) {}
void envoy_dynamic_module_on_http_filter_config_scheduled(void *e, const void *c, uint64_t id) {}
void envoy_dynamic_module_on_http_filter_http_callout_done(void *e, const void *f, uint64_t id, int r, void *h, size_t hn, void *b, size_t bn) {}
void envoy_dynamic_module_on_http_filter_http_stream_headers(void *e, const void *f, uint64_t id, void *h, size_t n, bool eos) {}
void envoy_dynamic_module_on_http_filter_http_stream_data(void *e, const void *f, uint64_t id, const void *d, size_t n, bool eos) {}
void envoy_dynamic_module_on_http_filter_http_stream_trailers(void *e, const void *f, uint64_t id, void *h, size_t n) {}
void envoy_dynamic_module_on_http_filter_http_stream_complete(void *e, const void *f, uint64_t id) {}
void envoy_dynamic_module_on_http_filter_http_stream_reset(void *e, const void *f, uint64_t id, int r) {}
void envoy_dynamic_module_on_http_filter_config_http_callout_done(void *e, const void *c, uint64_t id, int r, void *h, size_t hn, void *b, size_t bn) {}
void envoy_dynamic_module_on_http_filter_config_http_stream_headers(void *e, const void *c, uint64_t id, void *h, size_t n, bool eos) {}
void envoy_dynamic_module_on_http_filter_config_http_stream_data(void *e, const void *c, uint64_t id, const void *d, size_t n, bool eos) {}
void envoy_dynamic_module_on_http_filter_config_http_stream_trailers(void *e, const void *c, uint64_t id, void *h, size_t n) {}
void envoy_dynamic_module_on_http_filter_config_http_stream_complete(void *e, const void *c, uint64_t id) {}
void envoy_dynamic_module_on_http_filter_config_http_stream_reset(void *e, const void *c, uint64_t id, int r) {}
void envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark(void *e, const void *f) {}
void envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark(void *e, const void *f) {}
