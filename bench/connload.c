// SPDX-License-Identifier: Apache-2.0
/*
 * connload: new TCP connections per second against one HTTP server, bounded in time and count.
 *
 * Each connection: non-blocking connect, one small "GET / HTTP/1.1" with Connection: close,
 * read the response to EOF, close. `-c` connections are kept in flight (epoll, one thread);
 * the run stops after `-t` seconds or `-n` completed connections, whichever comes first, and a
 * connection that does not finish within 2 s counts as a timeout. The server closes first
 * (Connection: close), so TIME_WAIT sits on the server and client ports are reused at once.
 *
 * Prints one line of key=value pairs: conns, seconds, rate (conn/s), p01/p50/p90/p99 of
 * connect + first response byte in microseconds, and every failure by kind (all should be 0).
 *
 * `-b SRC` binds every connection to that source address (the port is still picked at connect
 * time: IP_BIND_ADDRESS_NO_PORT), so clients of one namespace can keep their flows apart.
 *
 * Usage: connload -a ADDR [-p PORT] [-c INFLIGHT] [-t SECONDS] [-n MAXCONNS] [-b SRC]
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_INFLIGHT 1024
#define MAX_CONNS 10000000L
#define CONN_TIMEOUT_NS 2000000000LL

enum state { IDLE, CONNECTING, READING };

struct conn {
	int fd;
	enum state st;
	int64_t started_ns;
	int got_byte;
};

static struct sockaddr_in target;
static struct sockaddr_in source; /* sin_family 0: no -b */
static const char *request;
static size_t request_len;
static uint32_t *lat_us;
static long done, lat_n;
static long err_connect, err_addrnotavail, err_refused, err_reset, err_timeout, err_other;

static int64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int cmp_u32(const void *a, const void *b)
{
	uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;

	return (x > y) - (x < y);
}

static void count_error(int err)
{
	switch (err) {
	case EADDRNOTAVAIL:
		err_addrnotavail++;
		break;
	case ECONNREFUSED:
		err_refused++;
		break;
	case ECONNRESET:
		err_reset++;
		break;
	default:
		err_other++;
	}
}

static void finish(int ep, struct conn *c)
{
	epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
	close(c->fd);
	c->fd = -1;
	c->st = IDLE;
}

static int start(int ep, struct conn *c)
{
	struct epoll_event ev = { .events = EPOLLOUT };
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);

	if (fd < 0) {
		err_connect++;
		return -1;
	}
	c->fd = fd;
	c->started_ns = now_ns();
	c->got_byte = 0;
	if (source.sin_family) {
		int one = 1;

		if (setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof(one)) < 0 ||
		    bind(fd, (struct sockaddr *)&source, sizeof(source)) < 0) {
			count_error(errno);
			close(fd);
			c->fd = -1;
			return -1;
		}
	}
	if (connect(fd, (struct sockaddr *)&target, sizeof(target)) < 0 &&
	    errno != EINPROGRESS) {
		count_error(errno);
		close(fd);
		c->fd = -1;
		return -1;
	}
	c->st = CONNECTING;
	ev.data.ptr = c;
	epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
	return 0;
}

static void on_event(int ep, struct conn *c, uint32_t events)
{
	char buf[4096];
	ssize_t n;

	if (c->st == CONNECTING) {
		int err = 0;
		socklen_t len = sizeof(err);
		struct epoll_event ev = { .events = EPOLLIN, .data.ptr = c };

		getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
		if (err || (events & EPOLLERR)) {
			count_error(err ? err : EIO);
			finish(ep, c);
			return;
		}
		if (send(c->fd, request, request_len, MSG_NOSIGNAL) != (ssize_t)request_len) {
			count_error(errno);
			finish(ep, c);
			return;
		}
		c->st = READING;
		epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
		return;
	}
	for (;;) {
		n = recv(c->fd, buf, sizeof(buf), 0);
		if (n > 0) {
			if (!c->got_byte) {
				c->got_byte = 1;
				if (lat_n < MAX_CONNS)
					lat_us[lat_n++] = (uint32_t)((now_ns() - c->started_ns) / 1000);
			}
			continue;
		}
		if (n == 0) { /* the server closed: one connection done */
			if (c->got_byte)
				done++;
			else
				err_other++;
			finish(ep, c);
			return;
		}
		if (errno == EAGAIN)
			return;
		count_error(errno);
		finish(ep, c);
		return;
	}
}

int main(int argc, char **argv)
{
	const char *addr = NULL;
	int port = 80, inflight = 32, opt, ep, i;
	double seconds = 5.0;
	long max_conns = 1000000;
	struct conn *conns;
	struct epoll_event events[256];
	int64_t t0, deadline, last_scan;
	char req[256];

	while ((opt = getopt(argc, argv, "a:p:c:t:n:b:")) != -1) {
		switch (opt) {
		case 'b':
			source.sin_family = AF_INET;
			if (inet_pton(AF_INET, optarg, &source.sin_addr) != 1)
				goto usage;
			break;
		case 'a':
			addr = optarg;
			break;
		case 'p':
			port = atoi(optarg);
			break;
		case 'c':
			inflight = atoi(optarg);
			break;
		case 't':
			seconds = atof(optarg);
			break;
		case 'n':
			max_conns = atol(optarg);
			break;
		default:
			goto usage;
		}
	}
	if (!addr || inflight < 1 || inflight > MAX_INFLIGHT || seconds <= 0 || seconds > 600 ||
	    max_conns < 1 || max_conns > MAX_CONNS)
		goto usage;
	memset(&target, 0, sizeof(target));
	target.sin_family = AF_INET;
	target.sin_port = htons((uint16_t)port);
	if (inet_pton(AF_INET, addr, &target.sin_addr) != 1)
		goto usage;
	snprintf(req, sizeof(req), "GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n", addr);
	request = req;
	request_len = strlen(req);
	lat_us = calloc((size_t)max_conns, sizeof(*lat_us));
	conns = calloc((size_t)inflight, sizeof(*conns));
	ep = epoll_create1(EPOLL_CLOEXEC);
	if (!lat_us || !conns || ep < 0) {
		perror("connload");
		return 1;
	}
	for (i = 0; i < inflight; i++)
		conns[i].fd = -1;

	t0 = now_ns();
	deadline = t0 + (int64_t)(seconds * 1e9);
	last_scan = t0;
	for (;;) {
		int64_t now = now_ns();
		long started_budget = max_conns - done;
		int active = 0, n;

		for (i = 0; i < inflight; i++) {
			if (conns[i].st != IDLE) {
				active++;
				continue;
			}
			if (now < deadline && active < started_budget) {
				if (start(ep, &conns[i]) == 0)
					active++;
			}
		}
		if (active == 0)
			break;
		n = epoll_wait(ep, events, 256, 10);
		for (i = 0; i < n; i++)
			on_event(ep, events[i].data.ptr, events[i].events);
		now = now_ns();
		if (now - last_scan > 100000000LL) { /* time out stuck connections */
			last_scan = now;
			for (i = 0; i < inflight; i++) {
				if (conns[i].st != IDLE &&
				    now - conns[i].started_ns > CONN_TIMEOUT_NS) {
					err_timeout++;
					finish(ep, &conns[i]);
				}
			}
		}
	}
	{
		double secs = (double)(now_ns() - t0) / 1e9;
		uint32_t p01 = 0, p50 = 0, p90 = 0, p99 = 0;

		if (lat_n) {
			qsort(lat_us, (size_t)lat_n, sizeof(*lat_us), cmp_u32);
			p01 = lat_us[lat_n * 1 / 100];
			p50 = lat_us[lat_n * 50 / 100];
			p90 = lat_us[lat_n * 90 / 100];
			p99 = lat_us[lat_n * 99 / 100];
		}
		printf("conns=%ld seconds=%.3f rate=%.1f p01_us=%u p50_us=%u p90_us=%u p99_us=%u "
		       "err_socket=%ld err_addrnotavail=%ld err_refused=%ld err_reset=%ld "
		       "err_timeout=%ld err_other=%ld\n",
		       done, secs, done / secs, p01, p50, p90, p99, err_connect, err_addrnotavail,
		       err_refused, err_reset, err_timeout, err_other);
	}
	return 0;
usage:
	fprintf(stderr, "usage: connload -a ADDR [-p PORT] [-c INFLIGHT(1-%d)] [-t SECONDS(<=600)] "
			"[-n MAXCONNS(<=%ld)] [-b SRC]\n",
		MAX_INFLIGHT, MAX_CONNS);
	return 2;
}
