/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Debug logging to the kernel trace pipe (`cat /sys/kernel/tracing/trace_pipe`),
 * as Calico's bpfLogLevel: Debug does. cfg_log_level is a load-time constant,
 * so at Off/Info the verifier removes these calls: no per-packet cost.
 */
#ifndef __TABBY_LOG_H
#define __TABBY_LOG_H

#include <bpf/bpf_helpers.h>

#include "config.h"

#define TBY_LOG_INFO 1
#define TBY_LOG_DEBUG 2

/*
 * Like bpf_printk, but the format string lives in its own .rodata.tby_log
 * section: .rodata stays exactly the config block the loader writes.
 */
#define log_debug(fmt, ...)                                                   \
	do {                                                                  \
		if (cfg_log_level >= TBY_LOG_DEBUG) {                         \
			static const char ____fmt[] __attribute__((           \
				section(".rodata.tby_log"))) = "tabby: " fmt; \
			bpf_trace_printk(____fmt, sizeof(____fmt),            \
					 ##__VA_ARGS__);                      \
		}                                                             \
	} while (0)

#endif /* __TABBY_LOG_H */
