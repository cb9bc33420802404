/*
 * edgewire's flood limit for Mosquitto 2.0: a device that publishes past its budget is
 * disconnected, and its logins are refused for a cool-off.
 *
 * Mosquitto reads every client as fast as it sends, on one thread, and has no per-client
 * publish limit; refusing a message after reading it costs the broker as much as carrying it.
 * A device flooding requests (17,000 a second from one client) took a neighbour's p99 from
 * 5.6 to 10.6 ms even with the bridge reading none of the flood (bench/flood.py). The embedded
 * broker slows such a device by leaving its connection unread (broker/pacing.py); Mosquitto
 * offers plugins no way to pause a connection, so this plugin ends it instead. Its budget is
 * therefore far above a device's own pace (a device replays its queue after an outage at
 * 500 requests a second, 1,000 at once): only a device that is broken or hostile meets it.
 *
 * Each PUBLISH a device sends (Mosquitto's ACL check for writing) is paid from its token bucket,
 * kept per username (one identity: client id = username = device id). The publish that finds
 * the bucket empty is refused, the device is disconnected (on the next turn of Mosquitto's loop,
 * not inside the check), and its logins are refused for the cool-off: 5 s, doubling with each
 * shut-out up to 120 s. A publish that arrives while a device is shut out (a client that logs in
 * by certificate, which no password check stops) is refused and disconnects it again. The
 * fleet's services (the bridge, the distributor, operators, monitors), named in
 * plugin_opt_services, are never limited. Every other check is left to the password file and the
 * ACL file (this plugin answers "defer").
 *
 * Build (needs mosquitto-dev and libmosquitto-dev):
 *     cc -shared -fPIC -O2 -o mosquitto_flood_limit.so mosquitto_flood_limit.c
 * or `python -m edgewire.broker.mosquitto_plugin DIR`. Then, in mosquitto.conf (the lines
 * `edgewire flash --broker-out` renders in flood_limit.conf):
 *     plugin /usr/lib/edgewire/mosquitto_flood_limit.so
 *     plugin_opt_services bridge-1 distributor-1 operator
 *     plugin_opt_rate 1000        publishes a second, after the burst
 *     plugin_opt_burst 1000       publishes at once
 */

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <mosquitto.h>
#include <mosquitto_broker.h>
#include <mosquitto_plugin.h>

#define TABLE_SIZE 131072 /* a power of two; at most half of it is used */
#define MAX_DEVICES (TABLE_SIZE / 2)
#define MAX_PENDING 1024

struct device {
	char *name;
	double tokens;
	double updated;
	double shut_until;
	double cool_off;
	bool kick_pending;
};

struct limits {
	double rate;
	double burst;
	double first_cool_off;
	double max_cool_off;
	char **services;
	int service_count;
	struct device *table;
	int used;
	char *pending[MAX_PENDING]; /* client ids to disconnect on the next tick */
	struct device *pending_device[MAX_PENDING];
	int pending_count;
	mosquitto_plugin_id_t *id;
};

static struct limits limits;

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static unsigned long hash(const char *s)
{
	unsigned long h = 1469598103934665603UL;
	while(*s){
		h = (h ^ (unsigned char)*s++) * 1099511628211UL;
	}
	return h;
}

static void forget_all(void)
{
	/* Made-up usernames cannot log in, so the table only grows with the fleet; a fleet past
	 * MAX_DEVICES starts every device afresh rather than grow without bound. */
	for(int i = 0; i < TABLE_SIZE; i++){
		free(limits.table[i].name);
	}
	memset(limits.table, 0, sizeof(struct device) * TABLE_SIZE);
	limits.used = 0;
}

static struct device *device_of(const char *name, double now)
{
	unsigned long i = hash(name) & (TABLE_SIZE - 1);
	while(limits.table[i].name){
		if(!strcmp(limits.table[i].name, name)){
			return &limits.table[i];
		}
		i = (i + 1) & (TABLE_SIZE - 1);
	}
	if(limits.used >= MAX_DEVICES){
		forget_all();
		return device_of(name, now);
	}
	char *copy = strdup(name);
	if(!copy){
		return NULL;
	}
	limits.table[i].name = copy;
	limits.table[i].tokens = limits.burst;
	limits.table[i].updated = now;
	limits.used++;
	return &limits.table[i];
}

static bool is_service(const char *name)
{
	for(int i = 0; i < limits.service_count; i++){
		if(!strcmp(limits.services[i], name)){
			return true;
		}
	}
	return false;
}

static void kick_later(struct device *d, const char *client_id)
{
	if(d->kick_pending || !client_id || limits.pending_count >= MAX_PENDING){
		return;
	}
	char *copy = strdup(client_id);
	if(copy){
		limits.pending_device[limits.pending_count] = d;
		limits.pending[limits.pending_count++] = copy;
		d->kick_pending = true;
	}
}

static int on_acl_check(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_acl_check *ed = event_data;
	(void)event;
	(void)userdata;

	if(ed->access != MOSQ_ACL_WRITE){
		return MOSQ_ERR_PLUGIN_DEFER;
	}
	const char *name = mosquitto_client_username(ed->client);
	if(!name || is_service(name)){
		return MOSQ_ERR_PLUGIN_DEFER;
	}
	double now = now_s();
	struct device *d = device_of(name, now);
	if(!d){
		return MOSQ_ERR_PLUGIN_DEFER;
	}
	if(now < d->shut_until){
		kick_later(d, mosquitto_client_id(ed->client));
		return MOSQ_ERR_ACL_DENIED;
	}
	if(now > d->updated){
		d->tokens += (now - d->updated) * limits.rate;
		if(d->tokens > limits.burst){
			d->tokens = limits.burst;
		}
	}
	d->updated = now;
	if(d->tokens >= 1.0){
		d->tokens -= 1.0;
		return MOSQ_ERR_PLUGIN_DEFER;
	}
	d->cool_off = d->cool_off > 0 ? d->cool_off * 2 : limits.first_cool_off;
	if(d->cool_off > limits.max_cool_off){
		d->cool_off = limits.max_cool_off;
	}
	d->shut_until = now + d->cool_off;
	mosquitto_log_printf(MOSQ_LOG_WARNING,
			"edgewire flood limit: %s published past %g a second (%g at once): disconnected, "
			"its logins refused for %g s",
			name, limits.rate, limits.burst, d->cool_off);
	kick_later(d, mosquitto_client_id(ed->client));
	return MOSQ_ERR_ACL_DENIED;
}

static int on_basic_auth(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_basic_auth *ed = event_data;
	(void)event;
	(void)userdata;

	if(!ed->username || is_service(ed->username)){
		return MOSQ_ERR_PLUGIN_DEFER;
	}
	double now = now_s();
	struct device *d = device_of(ed->username, now);
	if(d && now < d->shut_until){
		return MOSQ_ERR_AUTH;
	}
	return MOSQ_ERR_PLUGIN_DEFER;
}

static int on_tick(int event, void *event_data, void *userdata)
{
	(void)event;
	(void)event_data;
	(void)userdata;

	int count = limits.pending_count;
	limits.pending_count = 0;
	for(int i = 0; i < count; i++){
		mosquitto_kick_client_by_clientid(limits.pending[i], false);
		free(limits.pending[i]);
		limits.pending_device[i]->kick_pending = false;
	}
	return MOSQ_ERR_SUCCESS;
}

static int number_option(const char *key, const char *value, double low, double high, double *out)
{
	char *end = NULL;
	double v = strtod(value, &end);
	if(!end || *end || !(v >= low && v <= high)){
		mosquitto_log_printf(MOSQ_LOG_ERR,
				"edgewire flood limit: plugin_opt_%s %s: expected a number from %g to %g", key, value, low, high);
		return MOSQ_ERR_INVAL;
	}
	*out = v;
	return MOSQ_ERR_SUCCESS;
}

static int services_option(const char *value)
{
	char *copy = strdup(value);
	if(!copy){
		return MOSQ_ERR_NOMEM;
	}
	for(char *tok = strtok(copy, " ,"); tok; tok = strtok(NULL, " ,")){
		char **grown = realloc(limits.services, sizeof(char *) * (limits.service_count + 1));
		if(!grown){
			free(copy);
			return MOSQ_ERR_NOMEM;
		}
		limits.services = grown;
		limits.services[limits.service_count++] = strdup(tok);
	}
	free(copy);
	return MOSQ_ERR_SUCCESS;
}

int mosquitto_plugin_version(int supported_version_count, const int *supported_versions)
{
	for(int i = 0; i < supported_version_count; i++){
		if(supported_versions[i] == 5){
			return 5;
		}
	}
	return -1;
}

int mosquitto_plugin_init(mosquitto_plugin_id_t *identifier, void **userdata, struct mosquitto_opt *options,
		int option_count)
{
	int rc = MOSQ_ERR_SUCCESS;
	(void)userdata;

	memset(&limits, 0, sizeof(limits));
	limits.rate = 1000;
	limits.burst = 1000;
	limits.first_cool_off = 5;
	limits.max_cool_off = 120;
	limits.id = identifier;
	for(int i = 0; i < option_count && rc == MOSQ_ERR_SUCCESS; i++){
		const char *key = options[i].key, *value = options[i].value;
		if(!strcmp(key, "rate")){
			rc = number_option(key, value, 1, 1e7, &limits.rate);
		}else if(!strcmp(key, "burst")){
			rc = number_option(key, value, 1, 1e8, &limits.burst);
		}else if(!strcmp(key, "cool_off")){
			rc = number_option(key, value, 0.1, 86400, &limits.first_cool_off);
		}else if(!strcmp(key, "max_cool_off")){
			rc = number_option(key, value, 0.1, 86400, &limits.max_cool_off);
		}else if(!strcmp(key, "services")){
			rc = services_option(value);
		}else{
			mosquitto_log_printf(MOSQ_LOG_ERR,
					"edgewire flood limit: unknown option plugin_opt_%s (known: rate, burst, cool_off, "
					"max_cool_off, services)", key);
			rc = MOSQ_ERR_INVAL;
		}
	}
	if(rc != MOSQ_ERR_SUCCESS){
		return rc;
	}
	limits.table = calloc(TABLE_SIZE, sizeof(struct device));
	if(!limits.table){
		return MOSQ_ERR_NOMEM;
	}
	mosquitto_log_printf(MOSQ_LOG_INFO,
			"edgewire flood limit: %g publishes a second per device, %g at once; %d services unlimited",
			limits.rate, limits.burst, limits.service_count);
	rc = mosquitto_callback_register(identifier, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL, NULL);
	if(!rc) rc = mosquitto_callback_register(identifier, MOSQ_EVT_BASIC_AUTH, on_basic_auth, NULL, NULL);
	if(!rc) rc = mosquitto_callback_register(identifier, MOSQ_EVT_TICK, on_tick, NULL, NULL);
	return rc;
}

int mosquitto_plugin_cleanup(void *userdata, struct mosquitto_opt *options, int option_count)
{
	(void)userdata;
	(void)options;
	(void)option_count;

	mosquitto_callback_unregister(limits.id, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL);
	mosquitto_callback_unregister(limits.id, MOSQ_EVT_BASIC_AUTH, on_basic_auth, NULL);
	mosquitto_callback_unregister(limits.id, MOSQ_EVT_TICK, on_tick, NULL);
	if(limits.table){
		forget_all();
		free(limits.table);
	}
	for(int i = 0; i < limits.pending_count; i++){
		free(limits.pending[i]);
	}
	for(int i = 0; i < limits.service_count; i++){
		free(limits.services[i]);
	}
	free(limits.services);
	memset(&limits, 0, sizeof(limits));
	return MOSQ_ERR_SUCCESS;
}
