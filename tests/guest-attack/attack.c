/*
 * A hostile guest for skiff's guest-side attack test (tests/tests/attack/mod.rs).
 *
 * Freestanding x86_64 code that skiff boots as an ELF "kernel" through the Linux 64-bit
 * entry (long mode, the first GiB identity-mapped by the VMM, interrupts off). It plays a
 * guest kernel that drives skiff's virtio-mmio devices and the i8042 directly, as a
 * tenant's own kernel can: it sets up rings the VMM must refuse, breaks rings the device
 * processes serve, floods the keyboard controller, and drives a second, well-behaved drive
 * with correct requests before and after, to show that one device's abuse costs nothing to
 * the others.
 *
 * Protocol with the test on the serial console (COM1, polled):
 *   "ATTACK <phase> ok <details>" or "ATTACK <phase> FAIL <why>" for each phase, then
 *   "ATTACK-WAIT <phase>": the guest polls the UART until the test sends a line, so the
 *   test can check the host's processes while nothing else happens;
 *   "ATTACK-DONE" at the end, then a reset through the i8042 (skiff exits 0).
 *
 * The devices are found by scanning the virtio-mmio windows from 0xd0000000 and told apart
 * by device id and, for drives, by capacity: the victim drive has VICTIM_SECTORS sectors,
 * the good drive GOOD_SECTORS (the test makes the images that size).
 */
#include <stdint.h>

typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;

#define VICTIM_SECTORS 6144u /* 3 MiB */
#define GOOD_SECTORS 10240u  /* 5 MiB */
#define RAM_BYTES (256ull << 20)

#define MMIO_BASE 0xd0000000ull
#define MMIO_STRIDE 0x1000ull
#define MMIO_SLOTS 16

#define R_MAGIC 0x000
#define R_DEVICE_ID 0x008
#define R_DEVICE_FEATURES 0x010
#define R_DEVICE_FEATURES_SEL 0x014
#define R_DRIVER_FEATURES 0x020
#define R_DRIVER_FEATURES_SEL 0x024
#define R_QUEUE_SEL 0x030
#define R_QUEUE_NUM_MAX 0x034
#define R_QUEUE_NUM 0x038
#define R_QUEUE_READY 0x044
#define R_QUEUE_NOTIFY 0x050
#define R_INTERRUPT_STATUS 0x060
#define R_INTERRUPT_ACK 0x064
#define R_STATUS 0x070
#define R_QUEUE_DESC_LOW 0x080
#define R_QUEUE_DESC_HIGH 0x084
#define R_QUEUE_DRIVER_LOW 0x090
#define R_QUEUE_DRIVER_HIGH 0x094
#define R_QUEUE_DEVICE_LOW 0x0a0
#define R_QUEUE_DEVICE_HIGH 0x0a4
#define R_CONFIG 0x100

#define S_ACK 1u
#define S_DRIVER 2u
#define S_DRIVER_OK 4u
#define S_FEATURES_OK 8u
#define S_NEEDS_RESET 0x40u

#define QSIZE 16
#define F_NEXT 1
#define F_WRITE 2

/* Polls of a register before giving up (each is a VM exit: slow under TCG, never endless). */
#define POLLS 2000000u

struct desc {
	u64 addr;
	u32 len;
	u16 flags;
	u16 next;
};

struct ring {
	struct desc desc[QSIZE];
	u8 pad0[4096 - QSIZE * sizeof(struct desc)];
	volatile u16 avail[2 + QSIZE + 1];
	u8 pad1[4096 - (3 + QSIZE) * 2];
	volatile u16 used_flags;
	volatile u16 used_idx;
	volatile u32 used_elems[2 * QSIZE];
	u8 pad2[4096 - 4 - 8 * QSIZE];
};

struct blk_hdr {
	u32 type;
	u32 reserved;
	u64 sector;
};

/* Two rings per device kind (net has rx and tx), page-aligned, identity-mapped. */
static struct ring rings[2] __attribute__((aligned(4096)));
static struct blk_hdr hdr __attribute__((aligned(64)));
static u8 buf[512] __attribute__((aligned(512)));
static volatile u8 req_status __attribute__((aligned(64)));
u8 attack_stack[65536] __attribute__((aligned(16), used));
/* Page directory for 3-4 GiB (2 MiB pages): the virtio-mmio windows live there. */
static u64 pd_high[512] __attribute__((aligned(4096)));

void *memset(void *d, int c, unsigned long n)
{
	u8 *p = d;
	while (n--)
		*p++ = (u8)c;
	return d;
}

void *memcpy(void *d, const void *s, unsigned long n)
{
	u8 *p = d;
	const u8 *q = s;
	while (n--)
		*p++ = *q++;
	return d;
}

static inline void outb(u16 port, u8 v)
{
	__asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}

static inline u8 inb(u16 port)
{
	u8 v;
	__asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

static inline void barrier(void)
{
	__asm__ volatile("mfence" : : : "memory");
}

static inline u32 rd(u64 base, u32 reg)
{
	return *(volatile u32 *)(base + reg);
}

static inline void wr(u64 base, u32 reg, u32 v)
{
	*(volatile u32 *)(base + reg) = v;
}

/* ---------------------------------------------------------------- console */

static void putc(char c)
{
	for (u32 i = 0; i < 100000 && !(inb(0x3fd) & 0x20); i++)
		;
	outb(0x3f8, (u8)c);
}

static void puts(const char *s)
{
	while (*s)
		putc(*s++);
}

static void puthex(u64 v)
{
	puts("0x");
	int started = 0;
	for (int i = 60; i >= 0; i -= 4) {
		u32 d = (v >> i) & 0xf;
		if (d || started || i == 0) {
			putc("0123456789abcdef"[d]);
			started = 1;
		}
	}
}

static void putdec(u64 v)
{
	char b[24];
	int n = 0;
	do {
		b[n++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	while (n)
		putc(b[--n]);
}

/* Waits for the test to send a line (polling the UART: the guest's own CPU, nothing else). */
static void wait_go(const char *phase)
{
	puts("ATTACK-WAIT ");
	puts(phase);
	puts("\n");
	for (;;) {
		if (inb(0x3fd) & 1) {
			if (inb(0x3f8) == '\n')
				return;
		}
		__asm__ volatile("pause");
	}
}

static int failures;

static void result(const char *phase, int ok, const char *what, u64 v)
{
	puts("ATTACK ");
	puts(phase);
	puts(ok ? " ok " : " FAIL ");
	puts(what);
	puts(" ");
	puthex(v);
	puts("\n");
	if (!ok)
		failures++;
}

/* ---------------------------------------------------------------- virtio-mmio */

/* Resets the device and negotiates VIRTIO_F_VERSION_1 only; returns the status. */
static u32 negotiate(u64 b)
{
	wr(b, R_STATUS, 0);
	wr(b, R_STATUS, S_ACK);
	wr(b, R_STATUS, S_ACK | S_DRIVER);
	wr(b, R_DRIVER_FEATURES_SEL, 1);
	wr(b, R_DRIVER_FEATURES, 1); /* VERSION_1 (bit 32) */
	wr(b, R_DRIVER_FEATURES_SEL, 0);
	wr(b, R_DRIVER_FEATURES, 0);
	wr(b, R_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
	return rd(b, R_STATUS);
}

static void set_queue(u64 b, u32 q, u32 num, u64 desc, u64 avail, u64 used)
{
	wr(b, R_QUEUE_SEL, q);
	if (num)
		wr(b, R_QUEUE_NUM, num);
	wr(b, R_QUEUE_DESC_LOW, (u32)desc);
	wr(b, R_QUEUE_DESC_HIGH, (u32)(desc >> 32));
	wr(b, R_QUEUE_DRIVER_LOW, (u32)avail);
	wr(b, R_QUEUE_DRIVER_HIGH, (u32)(avail >> 32));
	wr(b, R_QUEUE_DEVICE_LOW, (u32)used);
	wr(b, R_QUEUE_DEVICE_HIGH, (u32)(used >> 32));
	wr(b, R_QUEUE_READY, 1);
}

static void good_queue(u64 b, u32 q, struct ring *r)
{
	memset(r, 0, sizeof(*r));
	set_queue(b, q, QSIZE, (u64)(uintptr_t)r->desc, (u64)(uintptr_t)r->avail,
		  (u64)(uintptr_t)&r->used_flags);
}

static u32 driver_ok(u64 b)
{
	wr(b, R_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
	return rd(b, R_STATUS);
}

/* Polls the status until DEVICE_NEEDS_RESET shows; returns the status seen last. */
static u32 wait_needs_reset(u64 b)
{
	u32 s = 0;
	for (u32 i = 0; i < POLLS; i++) {
		s = rd(b, R_STATUS);
		if (s & S_NEEDS_RESET)
			break;
	}
	return s;
}

/* One virtio-blk request (type 0 read, 1 write) of one sector on queue 0 of a ready device;
 * returns 0 when it completed with VIRTIO_BLK_S_OK, else a code naming what went wrong. */
static u32 blk_request(u64 b, struct ring *r, u32 type, u64 sector)
{
	u16 slot = r->avail[1];
	u16 want = (u16)(r->used_idx + 1);
	hdr.type = type;
	hdr.reserved = 0;
	hdr.sector = sector;
	req_status = 0xff;
	r->desc[0] = (struct desc){ (u64)(uintptr_t)&hdr, sizeof(hdr), F_NEXT, 1 };
	r->desc[1] = (struct desc){ (u64)(uintptr_t)buf, 512, (u16)(F_NEXT | (type == 0 ? F_WRITE : 0)), 2 };
	r->desc[2] = (struct desc){ (u64)(uintptr_t)&req_status, 1, F_WRITE, 0 };
	r->avail[2 + slot % QSIZE] = 0;
	barrier();
	r->avail[1] = (u16)(slot + 1);
	barrier();
	wr(b, R_QUEUE_NOTIFY, 0);
	for (u32 i = 0; i < POLLS; i++) {
		barrier();
		if (r->used_idx == want)
			return req_status == 0 ? 0 : 0x100u | req_status;
		if (rd(b, R_STATUS) & S_NEEDS_RESET)
			return 0x200;
	}
	return 0x300; /* no completion */
}

static void fill(u8 seed)
{
	for (u32 i = 0; i < sizeof(buf); i++)
		buf[i] = (u8)(seed + i * 7);
}

static int check(u8 seed)
{
	for (u32 i = 0; i < sizeof(buf); i++)
		if (buf[i] != (u8)(seed + i * 7))
			return 0;
	return 1;
}

/* A full well-behaved round trip on the good drive: write sector 8, read it back. */
static void good_drive_roundtrip(const char *phase, u64 good, u8 seed)
{
	u32 s = negotiate(good);
	if (!(s & S_FEATURES_OK)) {
		result(phase, 0, "good-drive-negotiation-status", s);
		return;
	}
	good_queue(good, 0, &rings[1]);
	s = driver_ok(good);
	if (s & S_NEEDS_RESET) {
		result(phase, 0, "good-drive-status", s);
		return;
	}
	fill(seed);
	u32 e = blk_request(good, &rings[1], 1, 8);
	if (e) {
		result(phase, 0, "good-drive-write", e);
		return;
	}
	memset(buf, 0, sizeof(buf));
	e = blk_request(good, &rings[1], 0, 8);
	if (e) {
		result(phase, 0, "good-drive-read", e);
		return;
	}
	result(phase, check(seed), "good-drive-roundtrip-seed", seed);
}

/* A ring the VMM must refuse at DRIVER_OK: the device reports DEVICE_NEEDS_RESET at once. */
static void refused_queue(const char *phase, u64 b, u32 num, u64 desc, u64 avail, u64 used)
{
	negotiate(b);
	set_queue(b, 0, num, desc, avail, used);
	u32 s = driver_ok(b);
	result(phase, (s & S_NEEDS_RESET) != 0, "status", s);
	wait_go(phase);
}

/* ---------------------------------------------------------------- attacks */

static void attack_blk(u64 v)
{
	struct ring *r = &rings[0];
	u64 d = (u64)(uintptr_t)r->desc, a = (u64)(uintptr_t)r->avail, u = (u64)(uintptr_t)&r->used_flags;

	/* Finding 6: queue setup the backend must never see. */
	refused_queue("size-0", v, 0, d, a, u);
	refused_queue("size-3", v, 3, d, a, u);
	refused_queue("ring-past-ram", v, QSIZE, RAM_BYTES - 128, a, u);
	refused_queue("ring-above-4g", v, QSIZE, 0x100000000000ull, a, u);
	refused_queue("ring-in-mmio-hole", v, QSIZE, MMIO_BASE, a, u);
	refused_queue("ring-misaligned", v, QSIZE, d + 2, a, u);

	/* Finding 2: the available index moved far past the queue size. */
	negotiate(v);
	good_queue(v, 0, r);
	u32 s = driver_ok(v);
	r->avail[1] = 1000;
	barrier();
	wr(v, R_QUEUE_NOTIFY, 0);
	s = wait_needs_reset(v);
	u32 isr = rd(v, R_INTERRUPT_STATUS);
	result("avail-idx-far", (s & S_NEEDS_RESET) && (isr & 2), "status|isr<<16", s | isr << 16);
	wr(v, R_INTERRUPT_ACK, isr);
	wait_go("avail-idx-far");

	/* Finding 3: a head index past the queue size. */
	negotiate(v);
	good_queue(v, 0, r);
	driver_ok(v);
	r->avail[2] = 999;
	barrier();
	r->avail[1] = 1;
	barrier();
	wr(v, R_QUEUE_NOTIFY, 0);
	s = wait_needs_reset(v);
	result("head-out-of-range", (s & S_NEEDS_RESET) != 0, "status", s);
	wait_go("head-out-of-range");

	/* After a reset the same device serves requests again: its worker is alive. */
	negotiate(v);
	good_queue(v, 0, r);
	s = driver_ok(v);
	memset(buf, 0, sizeof(buf));
	u32 e = blk_request(v, r, 0, 0);
	int ok = !e && buf[0] == 'V' && buf[1] == 'I' && buf[2] == 'C' && buf[3] == 'T';
	result("victim-serves-after-reset", ok, "error|status<<16", e | (u64)s << 16);
	wr(v, R_STATUS, 0);
	wait_go("victim-serves-after-reset");
}

static void attack_net(u64 n)
{
	/* Finding 2 on both rings of skiff-net (rx 0, tx 1); the test then sends frames into the
	 * TAP so the rx path meets its broken ring too. */
	negotiate(n);
	good_queue(n, 0, &rings[0]);
	good_queue(n, 1, &rings[1]);
	driver_ok(n);
	rings[0].avail[1] = 1000;
	rings[1].avail[1] = 2000;
	barrier();
	wr(n, R_QUEUE_NOTIFY, 1);
	wr(n, R_QUEUE_NOTIFY, 0);
	u32 s = wait_needs_reset(n);
	result("net-avail-idx-far", (s & S_NEEDS_RESET) != 0, "status", s);
	wait_go("net-avail-idx-far");
	wr(n, R_STATUS, 0);
}

static void attack_i8042(void)
{
	/* Finding 4: commands that each queue an output byte, never read. */
	for (u32 i = 0; i < 100000; i++)
		outb(0x64, 0x20);
	u32 drained = 0;
	while ((inb(0x64) & 1) && drained < 1000000) {
		inb(0x60);
		drained++;
	}
	result("i8042-flood", drained <= 16, "bytes-queued", drained);
	wait_go("i8042-flood");
}

void attack_main(void)
{
	/* Map 3-4 GiB (2 MiB pages, uncached) into the VMM's 1 GiB identity map. */
	for (u64 i = 0; i < 512; i++)
		pd_high[i] = (0xc0000000ull + (i << 21)) | 0x9b; /* P RW PWT PCD PS */
	volatile u64 *pdpt = (volatile u64 *)0xa000;
	pdpt[3] = (u64)(uintptr_t)pd_high | 3;
	__asm__ volatile("mov %%cr3, %%rax; mov %%rax, %%cr3" : : : "rax", "memory");

	puts("ATTACK-START\n");
	u64 victim = 0, good = 0, net = 0;
	for (u32 i = 0; i < MMIO_SLOTS; i++) {
		u64 b = MMIO_BASE + i * MMIO_STRIDE;
		if (rd(b, R_MAGIC) != 0x74726976)
			break;
		u32 id = rd(b, R_DEVICE_ID);
		u64 cap = rd(b, R_CONFIG) | (u64)rd(b, R_CONFIG + 4) << 32;
		puts("ATTACK-DEVICE ");
		puthex(b);
		puts(" id ");
		putdec(id);
		puts(" config0 ");
		puthex(cap);
		puts("\n");
		if (id == 2 && cap == VICTIM_SECTORS)
			victim = b;
		else if (id == 2 && cap == GOOD_SECTORS)
			good = b;
		else if (id == 1 && !net)
			net = b;
	}
	if (!victim || !good || !net) {
		result("find-devices", 0, "victim|good|net-found-bits", (u64)(victim != 0) | (u64)(good != 0) << 1 | (u64)(net != 0) << 2);
		puts("ATTACK-DONE\n");
		outb(0x64, 0xfe);
		for (;;)
			__asm__ volatile("hlt");
	}
	good_drive_roundtrip("good-drive-before", good, 11);
	wait_go("good-drive-before");
	attack_blk(victim);
	attack_net(net);
	attack_i8042();
	good_drive_roundtrip("good-drive-after", good, 77);
	wr(good, R_STATUS, 0);
	puts("ATTACK-DONE failures=");
	putdec((u64)failures);
	puts("\n");
	outb(0x64, 0xfe);
	for (;;)
		__asm__ volatile("cli; hlt");
}

__asm__(".section .text.start, \"ax\"\n"
	".global _start\n"
	"_start:\n"
	"  cli\n"
	"  lea attack_stack+65536(%rip), %rsp\n"
	"  call attack_main\n"
	"1: hlt\n"
	"  jmp 1b\n");
